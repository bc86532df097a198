"""What GKD across two vocabularies costs (``objectives.cross_vocab``: the projection and GOLD/ULD's hybrid) against
GKD's fused loss with one shared vocabulary, at real vocabulary sizes, in the same run.

    .venv/bin/python benchmarks/bench_hybrid_loss.py --threads 2     # 1024 positions, Qwen-sized student, Llama-3-sized teacher

Synthetic and model-free: random final hidden states ``[N, H]`` and random output layers stand in for a student of
``--student-vocab`` rows and a teacher of ``--teacher-vocab`` rows, ``--matched`` of whose tokens are paired (the
tokens both vocabularies write; every teacher token maps to a random student token for the projection). Timed, forward + backward into the student's hidden states, best of ``--repeats``:

- ``fused``: GKD's fused chunked D_β (``objectives.gkd.gkd_loss``) with a teacher of the student's own vocabulary,
  the shared-tokenizer baseline;
- ``projection``: the teacher's distribution mapped onto the student's vocabulary, then D_β, streamed in
  checkpointed chunks (``streamed_cross_vocab``);
- ``hybrid``: D_β on the matched tokens plus ULD's sorted distance on the rest, streamed the same way.

Printed: seconds per batch, positions per second, the ratio to ``fused``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
from bench_cross_tokenizer import best_of  # (benchmarks/ is the script's own folder)

from opd.objectives.cross_vocab import (
    VocabularyMatch,
    VocabularyProjection,
    hybrid_divergence,
    projected_divergence,
    streamed_cross_vocab,
)
from opd.objectives.fused import OutputHead
from opd.objectives.gkd import gkd_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--student-vocab", type=int, default=151_936)
    parser.add_argument("--teacher-vocab", type=int, default=128_256)
    parser.add_argument("--matched", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    N, H, V, W = args.positions, args.hidden, args.student_vocab, args.teacher_vocab
    student_head = torch.randn(V, H, generator=g) / H**0.5
    teacher_head = torch.randn(W, H, generator=g) / H**0.5
    shared_teacher_head = torch.randn(V, H, generator=g) / H**0.5
    hidden = torch.randn(N, H, generator=g)
    teacher_hidden = torch.randn(N, H, generator=g)
    student_ids, teacher_ids = torch.randperm(V, generator=g), torch.randperm(W, generator=g)
    match = VocabularyMatch(student_ids[: args.matched], teacher_ids[: args.matched], student_ids[args.matched:], teacher_ids[args.matched:])
    mask = torch.ones(1, N)

    def fused():
        h = hidden.clone().requires_grad_(True)
        result = gkd_loss(h[None], teacher_hidden[None], OutputHead(student_head), lambda x: x @ shared_teacher_head.T, mask,
                          beta=0.5, temperature=0.9, chunk_size=args.chunk)
        result.loss.backward()

    projection = VocabularyProjection(torch.randint(0, V, (W,), generator=g))

    def streamed(divergence):
        h = hidden.clone().requires_grad_(True)
        values = streamed_cross_vocab(h, teacher_hidden, lambda x: x @ student_head.T, lambda x: x @ teacher_head.T, divergence, args.chunk)
        (values[:, 0].sum() / N).backward()

    results = {**vars(args), "threads": torch.get_num_threads()}
    results["fused_s"] = best_of(args.repeats, fused)
    results["projection_s"] = best_of(args.repeats, lambda: streamed(partial(projected_divergence, projection=projection, beta=0.5, temperature=0.9)))
    results["hybrid_s"] = best_of(args.repeats, lambda: streamed(partial(hybrid_divergence, match=match, beta=0.5, temperature=0.9)))
    print(f"{N} positions, H={H}, student V={V}, teacher V={W}, {args.matched} matched, chunks of {args.chunk}, "
          f"{results['threads']} thread(s)")
    print(f"{'loss':<10} {'s/batch':>8} {'pos/s':>8} {'vs fused':>9}")
    for name in ("fused", "projection", "hybrid"):
        seconds = results[f"{name}_s"]
        print(f"{name:<10} {seconds:>8.3f} {N / seconds:>8.0f} {seconds / results['fused_s']:>8.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
