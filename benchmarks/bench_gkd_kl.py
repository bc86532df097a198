"""The GKD/OPSD ``kl`` diagnostic: a second full-vocabulary projection of both models (before) vs read off the fused loop (after).

    python benchmarks/bench_gkd_kl.py                       # V = 151,936, H = 512, N = 1024 tokens, 3 repeats
    python benchmarks/bench_gkd_kl.py --hidden 1024 --tokens 2048

Times the student phase of one GKD micro-batch at a real vocabulary on random hidden states:
the fused JSD forward + backward, plus the ``kl = mean(ℓ^S - ℓ^T)`` diagnostic computed either
the old way (``token_logprobs`` through both output layers again) or inside the fused loop
(``token_ids_BT``). Both variants run in the same process, alternating, and the script prints
the medians and their ratio; it also checks the two diagnostics agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import machine  # noqa: E402

from opd.models.scoring import token_logprobs  # noqa: E402
from opd.objectives import gkd_loss  # noqa: E402
from opd.objectives.fused import OutputHead  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    V, H, N = args.vocab, args.hidden, args.tokens
    student_w = (torch.randn(V, H, generator=g) * H**-0.5).requires_grad_()
    teacher_w = torch.randn(V, H, generator=g) * H**-0.5
    student_h = torch.randn(1, N, H, generator=g).requires_grad_()
    teacher_h = torch.randn(1, N, H, generator=g)
    ids = torch.randint(0, V, (1, N), generator=g)
    mask = torch.ones(1, N, dtype=torch.long)
    head, teacher_project = OutputHead(student_w), (lambda h: h @ teacher_w.T)

    def before() -> float:
        result = gkd_loss(student_h, teacher_h, head, teacher_project, mask, 0.5, 0.9)
        result.loss.backward()
        with torch.no_grad():  # what methods/losses.sampled_kl did: both output layers once more
            s_logp, _ = token_logprobs(student_h.detach()[0], ids[0], lambda h: h @ student_w.detach().T)
            t_logp, _ = token_logprobs(teacher_h[0], ids[0], teacher_project)
        return float((s_logp - t_logp).mean())

    def after() -> float:
        result = gkd_loss(student_h, teacher_h, head, teacher_project, mask, 0.5, 0.9, token_ids_BT=ids)
        result.loss.backward()
        return result.sampled_kl

    times = {"before": [], "after": []}
    values = {}
    for _ in range(args.repeats + 1):  # the first round warms up and is not timed
        for name, fn in (("before", before), ("after", after)):
            student_w.grad = student_h.grad = None
            start = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t[1:]) for name, t in times.items()}
    print(f"# GKD student phase with the kl diagnostic — {machine()}")
    print(f"V={V}, H={H}, N={N} tokens, beta=0.5, tau=0.9, median of {args.repeats}\n")
    print("| kl diagnostic | s per micro-batch | kl |")
    print("|---|---|---|")
    for name, label in (("before", "second projection of both models"), ("after", "inside the fused loop")):
        print(f"| {label} | {med[name]:.3f} | {values[name]:.6f} |")
    print(f"\nafter / before: {med['after'] / med['before']:.2f}×; |Δkl| = {abs(values['after'] - values['before']):.2e}")


if __name__ == "__main__":
    main()
