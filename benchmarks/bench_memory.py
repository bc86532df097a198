"""The student phase at real shapes: activation checkpointing, and micro-batches by token budget and packing.

    python benchmarks/bench_memory.py checkpointing [--hidden 512 --layers 12 --rows 2 --tokens 4096]
    python benchmarks/bench_memory.py skewed [--hidden 256 --layers 4 --rows 16 --budget 16384]

``checkpointing``: forward + backward of the fused full-vocabulary loss (GKD's JSD, ``objectives.gkd_loss``) on a
randomly initialised Qwen3-architecture student with V = 151,936, ``rows`` rows of ``tokens`` tokens, with and
without ``gradient_checkpointing``: peak memory and time, the ratio of the two. The teacher's hidden states are
random and its output layer a frozen copy of the student's (its forward is not part of the student phase).

``skewed``: one step's student phase (forward + backward of the sampled-token log-probs) over ``rows`` rows whose
completion lengths are drawn from a long-tailed distribution between 64 and 4,096 tokens, trained as
(a) fixed-row micro-batches (``--fixed-rows`` rows each, in sampled order: ``train.grad_accum``), (b) micro-batches
under the token budget (``train.micro_batch_tokens``), (c) the same budget packed (``train.packing``): the share of
computed tokens that are padding, the number of passes and the time.

Each setting runs in a fresh process (so one's freed memory cannot hide the next one's peak); the table is
printed as markdown, and written to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import gib, machine, measure  # noqa: E402

from opd.models.loading import set_activation_checkpointing  # noqa: E402
from opd.models.rollouts import build_rollouts, stack_rows  # noqa: E402
from opd.models.scoring import completion_hidden_states, loss_head, rollout_logprobs  # noqa: E402
from opd.objectives import gkd_loss, step_normaliser  # noqa: E402
from opd.training.micro_batches import pass_tokens, plan_micro_batches  # noqa: E402

VOCAB = 151_936  # Qwen3's output layer


def qwen3(hidden: int, layers: int, vocab: int = VOCAB, seed: int = 0, implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = max(1, hidden // 64)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), head_dim=64, max_position_embeddings=32_768, tie_word_embeddings=True,
        attn_implementation=implementation,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def random_rollouts(prompt_lengths, completion_lengths, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (p,), generator=g).tolist() for p in prompt_lengths]
    completions = [torch.randint(1, vocab, (c,), generator=g).tolist() for c in completion_lengths]
    return build_rollouts(prompts, completions, pad_id=0)


# ----------------------------------------------------------------------------- one setting, in its own process


def run_checkpointing(args) -> dict:
    model = qwen3(args.hidden, args.layers)
    if args.checkpointing:
        set_activation_checkpointing(model, True)
    prompt = args.tokens // 16
    r = random_rollouts([prompt] * args.rows, [args.tokens - prompt] * args.rows, VOCAB)
    teacher_hidden_BCH = torch.randn(args.rows, args.tokens - prompt, args.hidden) / math.sqrt(args.hidden)
    frozen_head = model.get_output_embeddings().weight.detach().clone()
    normaliser = step_normaliser([r.loss_mask_BC], "token_mean")
    with measure(torch.device("cpu")) as m:
        hidden_BCH = completion_hidden_states(model, r)
        loss = gkd_loss(
            hidden_BCH, teacher_hidden_BCH, loss_head(model), lambda h: torch.nn.functional.linear(h, frozen_head).float(),
            r.loss_mask_BC, 0.5, 1.0, None, normaliser, None, False, None,  # opd's chunk: about 2^25 logits
        ).loss
        loss.backward()
    params = sum(p.numel() for p in model.parameters())
    return {"peak_bytes": m["peak_bytes"], "seconds": m["seconds"], "params": params, "loss": float(loss)}


def skewed_lengths(rows: int, seed: int) -> tuple[list[int], list[int]]:
    """Prompts of 64-256 tokens; completions log-normal around 400 tokens, clipped to [64, 4096] (a long tail)."""
    rng = random.Random(seed)
    prompts = [rng.randint(64, 256) for _ in range(rows)]
    completions = [int(min(4096, max(64, math.exp(rng.gauss(math.log(400), 1.1))))) for _ in range(rows)]
    return prompts, completions


def run_skewed(args) -> dict:
    model = qwen3(args.hidden, args.layers, vocab=args.vocab)
    prompts, completions = skewed_lengths(args.rows, args.seed)
    shapes = list(zip(prompts, completions))
    if args.layout == "fixed":
        plan = [list(range(i, min(i + args.fixed_rows, args.rows))) for i in range(0, args.rows, args.fixed_rows)]
    else:
        plan = plan_micro_batches(shapes, args.budget, packed=args.layout == "packed")
    packed = args.layout == "packed"
    whole = random_rollouts(prompts, completions, args.vocab)
    normaliser = step_normaliser([whole.loss_mask_BC], "token_mean")
    micro = [stack_rows([(whole, i) for i in m], pad_id=0) for m in plan]  # each padded to its own longest, as the loop does
    with measure(torch.device("cpu")) as m:
        for r in micro:
            logp_BC, _ = rollout_logprobs(model, r, packed=packed)
            (-(logp_BC * normaliser.weights(r.loss_mask_BC)).sum()).backward()
    computed = sum(pass_tokens([shapes[i] for i in part], packed) for part in plan)
    real = sum(p + c for p, c in shapes)
    return {
        "peak_bytes": m["peak_bytes"], "seconds": m["seconds"], "passes": len(plan), "computed_tokens": computed, "real_tokens": real,
        "padding_share": 1 - real / computed, "grad_norm": float(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()),
    }


# ----------------------------------------------------------------------------- the comparison


def child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--child"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_checkpointing(args, common: list[str]) -> str:
    plain = child(["checkpointing", *common])
    ckpt = child(["checkpointing", *common, "--checkpointing"])
    rows = [
        f"| without | {gib(plain['peak_bytes'])} | {plain['seconds']:.1f} s | {plain['loss']:.6f} |",
        f"| with | {gib(ckpt['peak_bytes'])} ({ckpt['peak_bytes'] / plain['peak_bytes']:.2f}×) | "
        f"{ckpt['seconds']:.1f} s ({ckpt['seconds'] / plain['seconds']:.2f}×) | {ckpt['loss']:.6f} |",
    ]
    return "\n".join([
        f"{machine()}. Qwen3-architecture student, {plain['params'] / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, "
        f"V = {VOCAB:,}), fp32, {args.rows} rows × {args.tokens:,} tokens, GKD's fused JSD (opd's default chunk), forward + backward:",
        "",
        "| gradient checkpointing | peak memory added | time | loss |",
        "|---|---|---|---|",
        *rows,
    ])


def compare_skewed(args, common: list[str]) -> str:
    results = {layout: child(["skewed", *common, "--layout", layout]) for layout in ("fixed", "budget", "packed")}
    base = results["fixed"]["seconds"]
    names = {"fixed": f"fixed rows ({args.fixed_rows} per micro-batch)", "budget": f"token budget ({args.budget:,})", "packed": f"token budget ({args.budget:,}), packed"}
    lines = [
        f"| {names[k]} | {v['passes']} | {v['computed_tokens']:,} | {100 * v['padding_share']:.1f}% | {gib(v['peak_bytes'])} | "
        f"{v['seconds']:.1f} s ({v['seconds'] / base:.2f}×) | {v['grad_norm']:.6f} |"
        for k, v in results.items()
    ]
    prompts, completions = skewed_lengths(args.rows, args.seed)
    return "\n".join([
        f"{machine()}. Qwen3-architecture student (hidden {args.hidden}, {args.layers} layers, V = {args.vocab:,}), fp32, one step's student "
        f"phase (sampled-token log-probs, forward + backward) over {args.rows} rows: completions {sorted(completions)} tokens "
        f"(log-normal, clipped to 64-4,096), prompts 64-256; {results['fixed']['real_tokens']:,} real tokens:",
        "",
        "| micro-batches | passes | computed tokens | padding | peak memory added | time | gradient norm |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bench", choices=["checkpointing", "skewed"])
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--rows", type=int)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--budget", type=int, default=16_384)
    parser.add_argument("--fixed-rows", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--layout", choices=["fixed", "budget", "packed"])
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    defaults = {"checkpointing": (512, 12, 2), "skewed": (256, 4, 16)}[args.bench]
    args.hidden, args.layers, args.rows = (v if v is not None else d for v, d in zip((args.hidden, args.layers, args.rows), defaults))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_checkpointing(args) if args.bench == "checkpointing" else run_skewed(args)))
        return
    common = [f"--hidden={args.hidden}", f"--layers={args.layers}", f"--rows={args.rows}", f"--tokens={args.tokens}", f"--vocab={args.vocab}",
              f"--budget={args.budget}", f"--fixed-rows={args.fixed_rows}", f"--seed={args.seed}"] + ([f"--threads={args.threads}"] if args.threads else [])
    table = compare_checkpointing(args, common) if args.bench == "checkpointing" else compare_skewed(args, common)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
