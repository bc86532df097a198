"""What a teacher with its own tokenizer costs (``teacher.tokenizer=own``), against the shared-tokenizer path, in the
same run.

    .venv/bin/python benchmarks/bench_cross_tokenizer.py                        # 32 rows x 1024 tokens, 3 repeats
    .venv/bin/python benchmarks/bench_cross_tokenizer.py --rows 16 --tokens 4096

One batch of completions of the embedded world's character-level student (random printable text, ``--tokens`` each,
ending in EOS) is scored by one teacher model in three ways:

- ``shared``: the teacher reads the student's ids (``ModelTeacher.token_logprobs``), the baseline;
- ``own_same``: the same teacher and tokenizer through the cross-tokenizer path (``CrossTokenizerTeacher.span_scores``:
  decode, re-encode, align, score, sum per span) — the path's own overhead, every span one token;
- ``own_bpe``: a teacher of the same shape whose tokenizer is a byte-level BPE trained on the text's alphabet (fewer,
  longer tokens: its forward pass is shorter).

Each is timed ``--repeats`` times (the best kept), and the alignment alone (the Python part) separately. Printed: seconds
per batch, thousands of student tokens per second, the ratio to ``shared``.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

from opd.models.alignment import align, decoded_intervals, encoded_intervals
from opd.models.rollouts import build_rollouts
from opd.tasks.base import Example
from opd.teachers.cross_tokenizer import CrossTokenizerTeacher
from opd.teachers.model import ModelTeacher
from opd.worlds.arithmetic import ModelShape, WorldSpec
from opd.worlds.build.common import init_model
from opd.worlds.tokenizer import build_byte_bpe_tokenizer, build_char_tokenizer

ALPHABET = string.ascii_lowercase + string.digits + " +=,|"


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128, help="the teacher's width (4 layers)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(args.tokens - 1)) for _ in range(args.rows)]
    char = build_char_tokenizer()
    bpe = build_byte_bpe_tokenizer(["".join(rng.choice(ALPHABET) for _ in range(2000)) for _ in range(50)] + texts[:4], vocab_size=600)
    shape = ModelShape(args.hidden, 4, 4 * args.hidden, 4)
    spec = WorldSpec(teacher_shape=shape, student_shape=shape, max_positions=args.tokens + 64)
    example = Example(prompt="12+30", answer="42")
    messages = lambda e: [{"role": "user", "content": e.prompt}]  # noqa: E731
    prompt = char.apply_chat_template(messages(example), tokenize=False, add_generation_prompt=True)
    prompt_ids = char(prompt, add_special_tokens=False)["input_ids"]
    completions = [char(t, add_special_tokens=False)["input_ids"] + [char.eos_token_id] for t in texts]
    rollouts = build_rollouts([prompt_ids] * args.rows, completions, char.pad_token_id)
    examples = [example] * args.rows
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        from transformers import AutoModelForCausalLM

        same_model = AutoModelForCausalLM.from_pretrained(init_model(Path(tmp) / "same", shape, char, spec, 1))
        bpe_model = AutoModelForCausalLM.from_pretrained(init_model(Path(tmp) / "bpe", shape, bpe, spec, 1))
        shared = ModelTeacher(same_model)
        own_same = CrossTokenizerTeacher(ModelTeacher(same_model), char, char, messages, None, [char.eos_token_id])
        own_bpe = CrossTokenizerTeacher(ModelTeacher(bpe_model), char, bpe, messages, None, [char.eos_token_id])

        def alignment_only(teacher_tok):
            for ids in completions:
                text, student = decoded_intervals(char, ids, {char.eos_token_id})
                align(student, encoded_intervals(teacher_tok, text)[1] + [(len(text), len(text))])

        results = {"rows": args.rows, "tokens": args.tokens, "hidden": args.hidden, "threads": torch.get_num_threads()}
        results["shared_s"] = best_of(args.repeats, lambda: shared.token_logprobs(rollouts))
        results["own_same_s"] = best_of(args.repeats, lambda: own_same.span_scores(rollouts, examples))
        results["own_bpe_s"] = best_of(args.repeats, lambda: own_bpe.span_scores(rollouts, examples))
        results["align_same_s"] = best_of(args.repeats, lambda: alignment_only(char))
        results["align_bpe_s"] = best_of(args.repeats, lambda: alignment_only(bpe))
        results["bpe_tokens_per_char"] = sum(len(bpe(t, add_special_tokens=False)["input_ids"]) for t in texts) / sum(map(len, texts))
    student_tokens = args.rows * args.tokens
    print(f"{args.rows} rows x {args.tokens} student tokens, teacher {shape}, {results['threads']} thread(s); "
          f"the BPE teacher reads {results['bpe_tokens_per_char']:.2f} tokens per character")
    print(f"{'path':<10} {'s/batch':>8} {'k tok/s':>8} {'vs shared':>9} {'alignment s':>12}")
    for path, align_key in (("shared", None), ("own_same", "align_same_s"), ("own_bpe", "align_bpe_s")):
        seconds = results[f"{path}_s"]
        aligned = f"{results[align_key]:>12.3f}" if align_key else f"{'-':>12}"
        print(f"{path:<10} {seconds:>8.3f} {student_tokens / seconds / 1000:>8.1f} {seconds / results['shared_s']:>8.2f}x {aligned}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
