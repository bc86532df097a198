"""Generation throughput: opd's own KV-cached sampler vs the in-process vLLM engine, weight push included.

    .venv-vllm/bin/python benchmarks/bench_engine.py                  # both models, batch 16 and 64, 256 new tokens
    .venv-vllm/bin/python benchmarks/bench_engine.py --opd-steps 3    # plus OPD steps at the real vocabulary, hf vs vllm
    .venv-vllm/bin/python benchmarks/bench_engine.py --batches --opd-steps 3 --ranks 2   # the OPD steps over 2 ranks alone

Needs the vLLM environment (``make vllm-env``). Builds two random Llama-style models in a
temporary directory, each with a word-level tokenizer as large as its vocabulary (so every
sampled id decodes): a small model at Qwen3's real vocabulary (V = 151,936) and a mid-size one
at V = 32,000. For each model and batch size it samples the same prompts with both samplers at
temperature 1 and reports generated tokens per second; the vLLM time includes one weight push
(``update_weights`` + the push before sampling), as in training. Engine start-up is reported
apart. ``--opd-steps N`` then runs N OPD steps (the arithmetic task, a second random model as the
teacher) with ``sampling.engine=hf`` and ``vllm`` and prints where each step's time went.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import machine  # noqa: E402


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` ids: the embedded world's characters, then ``<wN>`` words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opd.worlds.tokenizer import BOS, CHARACTERS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, UNK

    base = SPECIAL_TOKENS + CHARACTERS
    vocab = {t: i for i, t in enumerate(base)}
    vocab.update({f"<w{i}>": i for i in range(len(base), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left",
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def random_model(directory: Path, vocab: int, hidden: int, layers: int, heads: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(vocab)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=hidden // heads, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def prompts(tokenizer, n: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    texts = [f"What is {rng.randint(100, 999)}+{rng.randint(100, 999)}?" for _ in range(n)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def throughput(path: Path, batches: list[int], new_tokens: int) -> list[dict]:
    from opd.config.sections import SamplingConfig
    from opd.engines.hf import HFSampler
    from opd.engines.vllm import VLLMConfig, VLLMSampler
    from opd.models.loading import eos_token_ids, load_model, load_tokenizer

    tokenizer, model = load_tokenizer(str(path)), load_model(str(path), "student.path")
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    params = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
    hf = HFSampler(model, tokenizer, eos)
    start = time.perf_counter()
    engine = VLLMSampler(str(path), tokenizer, eos, VLLMConfig(), "float32", 0, torch.device("cpu"), 1024)
    startup = time.perf_counter() - start
    rows = []
    for batch in batches:
        ids = prompts(tokenizer, batch)
        hf.sample(ids[:2], SamplingConfig(max_new_tokens=4))  # warm-up
        engine.sample(ids[:2], SamplingConfig(max_new_tokens=4))
        start = time.perf_counter()
        r = hf.sample(ids, params, torch.Generator().manual_seed(1))
        hf_s = time.perf_counter() - start
        hf_tokens = int(r.completion_mask_BC.sum())
        start = time.perf_counter()
        engine.update_weights(model)  # one push per step, as in training
        r = engine.sample(ids, params, torch.Generator().manual_seed(1))
        vllm_s = time.perf_counter() - start
        vllm_tokens = int(r.completion_mask_BC.sum())
        rows.append(dict(vocab=model.config.vocab_size, params_m=sum(p.numel() for p in model.parameters()) / 1e6, batch=batch,
                         hf_tok_s=hf_tokens / hf_s, vllm_tok_s=vllm_tokens / vllm_s, startup_s=startup))
        print(json.dumps(rows[-1]), flush=True)
    engine.close()
    return rows


def opd_steps(student: Path, teacher: Path, steps: int, new_tokens: int, out: Path, ranks: int = 1) -> dict:
    """``steps`` OPD steps with each engine: in this process, or launched over ``ranks`` processes by torchrun
    (the cores split between them); seconds per step by phase (rank 0's) and generated tokens per second of
    sampling (all ranks' tokens over rank 0's sampling time)."""
    from opd.config.loading import load_config
    from opd.training.loop import train

    results = {}
    threads = max(1, (os.cpu_count() or 2) // ranks)
    for engine in ("hf", "vllm"):
        overrides = [
            f"student.path={student}", f"teacher.path={teacher}", f"train.steps={steps}", "train.prompts_per_step=4",
            "sampling.samples_per_prompt=4", f"sampling.max_new_tokens={new_tokens}", f"sampling.engine={engine}",
            "train.precision=fp32", f"train.threads={threads}", "eval.every=0", "eval.num_prompts=2", "eval.teacher=false", "eval.max_new_tokens=4",
            "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
            f"run.output_dir={out / engine}",
        ]
        if ranks == 1:
            summary = train(load_config(None, overrides))
        else:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                      "--master_port", str(29_400 + ranks), "-m", "opd", "train", str(ROOT / "configs" / "demo.yaml"), *overrides]
            done = subprocess.run(launch, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{engine} over {ranks} ranks failed:\n{done.stderr[-3000:]}")
            summary = json.loads((out / engine / "summary.json").read_text())
        seconds = summary["phase_seconds"]
        results[engine] = {
            "s_per_step": sum(seconds.values()) / steps, "gen_tok_s": summary["generated_tokens"] / max(seconds.get("sample", 0.0), 1e-9),
            **{k: v / steps for k, v in seconds.items()},
        }
        print(engine, json.dumps(results[engine]), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="*", default=[16, 64])
    p.add_argument("--opd-steps", type=int, default=0)
    p.add_argument("--ranks", type=int, default=1, help="launch the OPD steps over this many ranks (torchrun), each with its engine")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = random_model(tmp / "real_vocab", 151_936, 256, 4, 4, seed=0)
        mid = random_model(tmp / "mid", 32_000, 768, 8, 12, seed=1)
        rows = throughput(real, args.batches, args.new_tokens) + throughput(mid, args.batches, args.new_tokens) if args.batches else []
        steps = None
        if args.opd_steps:
            teacher = random_model(tmp / "teacher", 151_936, 256, 4, 4, seed=2)
            steps = opd_steps(real, teacher, args.opd_steps, args.new_tokens, tmp / "runs", args.ranks)
    print(f"\n# Generation: opd's sampler vs vLLM (in-process, one weight push included) — {machine()}")
    print(f"{args.new_tokens} new tokens per row, temperature 1, float32; tokens/s counts generated tokens\n")
    if rows:
        print("| model | V | batch | opd HFSampler tok/s | vLLM tok/s | vLLM / HF | engine start s |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['params_m']:.0f}M | {r['vocab']:,} | {r['batch']} | {r['hf_tok_s']:.0f} | {r['vllm_tok_s']:.0f} | "
              f"{r['vllm_tok_s'] / r['hf_tok_s']:.2f}× | {r['startup_s']:.0f} |")
    if steps:
        phases = ["sample", "sync", "teacher", "student", "optimizer"]
        where = f"{args.ranks} ranks, each with {max(1, (os.cpu_count() or 2) // args.ranks)} threads" if args.ranks > 1 else "one process"
        print(f"\n# OPD step at V = 151,936 (16 rows × {args.new_tokens} tokens), {where}, seconds per step, mean of {args.opd_steps}\n")
        print("| engine | s/step | generated tok/s | " + " | ".join(phases) + " |")
        print("|---|---|---|" + "---|" * len(phases))
        for engine, r in steps.items():
            print(f"| {engine} | {r['s_per_step']:.2f} | {r['gen_tok_s']:.0f} | " + " | ".join(f"{r.get(k, 0.0):.2f}" for k in phases) + " |")
        print(f"\nvllm / hf step time: {steps['vllm']['s_per_step'] / steps['hf']['s_per_step']:.2f}×")


if __name__ == "__main__":
    main()
