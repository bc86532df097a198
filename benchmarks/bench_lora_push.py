"""Pushing a LoRA student into the in-process vLLM engine: as adapters against merged full weights.

    .venv-vllm/bin/python benchmarks/bench_lora_push.py [--hidden 1024 --layers 28 --rank 16 --pushes 3]

A randomly initialised Qwen3-0.6B-shaped student (V = 151,936, float32) with LoRA on every linear layer of its
decoder. Two engines are built from its checkpoint, one with LoRA enabled (each push saves the adapters and loads
them as a new adapter version: ``VLLMSampler._push_adapter``) and one without (each push merges ``W + ΔW`` and
reloads every weight in place). Each push is timed after the adapters change; the table gives the median of
``--pushes`` pushes and the ratio. Needs the vLLM environment (``make vllm-env``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import machine  # noqa: E402

from opd.config.sections import LoraConfig  # noqa: E402
from opd.engines.vllm import VLLMConfig, VLLMSampler  # noqa: E402
from opd.models.loading import apply_lora  # noqa: E402
from opd.worlds.tokenizer import build_char_tokenizer  # noqa: E402


def student(hidden: int, layers: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=151_936, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128), head_dim=128 if hidden >= 1024 else 64, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def timed_pushes(sampler: VLLMSampler, model, pushes: int) -> list[float]:
    seconds = []
    for _ in range(pushes):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)  # new adapters each time, as after an optimizer step
        started = time.perf_counter()
        sampler.update_weights(model)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    tokenizer = build_char_tokenizer()
    base = student(args.hidden, args.layers)
    params = sum(p.numel() for p in base.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        base.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        model = apply_lora(base, LoraConfig(enabled=True, r=args.rank, alpha=2 * args.rank))
        adapter_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        for lora_rank in (args.rank, None):
            sampler = VLLMSampler(directory, tokenizer, [tokenizer.eos_token_id], VLLMConfig(), "float32", 0, torch.device("cpu"), 512, lora_rank)
            kind = sampler.push_kind
            seconds = timed_pushes(sampler, model, args.pushes)
            rows.append((kind, statistics.median(seconds), seconds))
            sampler.close()
            del sampler
    merged = next(s for k, s, _ in rows if k == "merged")
    lines = [
        f"{machine()}. Qwen3-shaped student, {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, V = 151,936), "
        f"float32; LoRA r = {args.rank} on every decoder linear layer ({adapter_params / 1e6:.1f}M adapter parameters); "
        f"{args.pushes} pushes each, after new adapters:",
        "",
        "| push | median time | each | vs merged |",
        "|---|---|---|---|",
        *(f"| {kind} | {median:.2f} s | {', '.join(f'{s:.2f}' for s in each)} s | {median / merged:.3f}× |" for kind, median, each in rows),
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
