"""End to end on the embedded world: opd's reverse-KL OPD vs TRL's DistillationTrainer, until 95% held-out accuracy.

    python benchmarks/bench_e2e_trl.py                  # both, the demo's settings, 64 completions per step
    python benchmarks/bench_e2e_trl.py --impls opd      # only opd (TRL not installed)

Both trainers get the same embedded teacher and student, prompts from the same arithmetic
task, 64 one-sample prompts per step, the demo's learning rate and schedule (2e-4, 10 warm-up
steps, cosine to 0.1×), AdamW, gradient clipping 1.0, 40 new tokens at temperature 1, float32.
The two libraries mean different objectives by reverse-KL on-policy distillation: opd's
OPD (``opd``) uses the sampled-token advantage ``-(ℓ^S - ℓ^T)`` (teacher log-probs of the
sampled tokens only); TRL's DistillationTrainer with ``beta=1`` minimises the full-vocabulary
reverse KL at every position, which opd also runs (``opd_full_vocab``: GKD with β = 1, always
on-policy) for a like-for-like comparison. Every ``--eval-every`` steps each run is scored with the same greedy
held-out evaluation (opd's, 256 prompts); evaluation time is excluded from the training wall
time. Reported: training wall time and student-generated tokens until accuracy ≥ target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import machine  # noqa: E402

from opd.config.loading import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def settings(args) -> list[str]:
    """Overrides that turn the demo config into this benchmark's opd run."""
    return [
        f"train.steps={args.max_steps}",
        f"train.prompts_per_step={args.batch}",
        "sampling.samples_per_prompt=1",
        f"eval.every={args.eval_every}",
        "log.progress_bar=false",
        "log.plot=false",
        "log.tensorboard=false",
        "eval.teacher=false",
        f"run.seed={args.seed}",
    ]


def first_reaching(evals: list[tuple[int, float, float, float]], target: float):
    """The first (step, accuracy, train seconds, tokens) whose accuracy ≥ target, else None."""
    return next((row for row in evals if row[1] >= target), None)


# opd's runs: its reverse-KL OPD (sampled-token advantage), and the full-vocabulary reverse KL
# TRL's DistillationTrainer minimises (GKD with β = 1, always on-policy, temperature 1).
OPD_RUNS = {
    "opd": [],
    "opd_full_vocab": ["method.name=gkd", "method.gkd.beta=1.0", "method.gkd.lambda_onpolicy=1.0", "method.gkd.temperature=1.0"],
}


def run_opd(args, out_dir: Path, impl: str = "opd") -> dict:
    from opd.training.loop import train
    from opd.training.metrics import read_metrics

    cfg = load_config(ROOT / "configs/demo.yaml", settings(args) + OPD_RUNS[impl] + [f"run.output_dir={out_dir / impl}"])
    started = time.time()
    train(cfg)
    wall = time.time() - started
    rows = read_metrics(out_dir / impl / "metrics.jsonl")
    seconds, tokens, at_step = 0.0, 0.0, {}
    for row in rows:
        if row["kind"] == "train":
            seconds += row["step_seconds"]
            tokens = row["generated_tokens"]
            at_step[row["step"]] = (seconds, tokens)
    evals = [(r["step"], r["accuracy"], *at_step.get(r["step"], (0.0, 0.0))) for r in rows if r["kind"] == "eval"]
    return {"impl": impl, "evals": evals, "process_seconds": wall}


def run_trl(args, out_dir: Path) -> dict:
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from opd.engines.hf import HFSampler
    from opd.models.loading import eos_token_ids, load_model, load_tokenizer
    from opd.tasks import build_task
    from opd.training.evaluation import evaluate

    cfg = load_config(ROOT / "configs/demo.yaml", settings(args))
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(cfg.student.path)
    student = load_model(cfg.student.path, "student.path")
    teacher = load_model(cfg.teacher.path, "teacher.path")
    task = build_task(cfg.task, cfg.run.seed)
    rng = random.Random(args.seed)
    prompts = [task.messages(e) for e in task.sample_train(args.batch * args.max_steps, rng)]
    from datasets import Dataset

    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    eval_examples = task.eval_examples()[: cfg.eval.num_prompts]
    eos = eos_token_ids(student, tokenizer)
    t = cfg.train
    config = DistillationConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        max_grad_norm=t.grad_clip,
        max_completion_length=cfg.sampling.max_new_tokens,
        temperature=cfg.sampling.temperature,
        beta=1.0,  # reverse KL
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        shuffle_dataset=False,
    )

    class Probe(TrainerCallback):
        """Accumulates generated tokens from the logs; evaluates every --eval-every steps, outside the timed span."""

        def __init__(self):
            self.evals, self.tokens, self.eval_seconds, self.started = [], 0.0, 0.0, None

        def on_train_begin(self, *a, **k):
            self.started = time.time()

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                self.tokens += logs["completions/mean_length"] * args.batch

        def on_step_end(self, _args, state, control, model=None, **k):
            if state.global_step % args.eval_every and state.global_step < args.max_steps:
                return
            start = time.time()
            result = evaluate(HFSampler(model, tokenizer, eos), tokenizer, task, eval_examples, cfg.sampling)
            model.train()
            self.eval_seconds += time.time() - start
            train_seconds = time.time() - self.started - self.eval_seconds
            self.evals.append((state.global_step, result["accuracy"], train_seconds, self.tokens))
            print(f"trl step {state.global_step}: accuracy {result['accuracy']:.3f}, {train_seconds:.0f} s", flush=True)
            if result["accuracy"] >= args.target:
                control.should_training_stop = True

    probe = Probe()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[probe]
    )
    before = evaluate(HFSampler(student, tokenizer, eos), tokenizer, task, eval_examples, cfg.sampling)
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints every step's logs
        trainer.train()
    return {"impl": "trl", "evals": [(0, before["accuracy"], 0.0, 0.0)] + probe.evals, "process_seconds": time.time() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", nargs="+", default=["opd", "opd_full_vocab", "trl"], choices=["opd", "opd_full_vocab", "trl"])
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for impl in args.impls:
            results.append(run_trl(args, Path(tmp)) if impl == "trl" else run_opd(args, Path(tmp), impl))
    print(f"\n# end to end to {args.target:.0%} held-out accuracy — {machine()}")
    print(f"# {args.batch} completions per step, at most {args.max_steps} steps, evaluated every {args.eval_every}\n")
    print("| trainer | reached at step | accuracy | train wall time | student tokens | best accuracy |")
    print("|---|---|---|---|---|---|")
    reached = {}
    for r in results:
        hit = first_reaching(r["evals"], args.target)
        best = max(acc for _, acc, _, _ in r["evals"])
        if hit is None:
            last = r["evals"][-1]
            print(f"| {r['impl']} | not reached in {last[0]} steps | — | {last[2]:.0f} s (all steps) | {last[3]:.0f} | {best:.3f} |")
        else:
            reached[r["impl"]] = hit
            print(f"| {r['impl']} | {hit[0]} | {hit[1]:.3f} | {hit[2]:.0f} s | {hit[3]:.0f} | {best:.3f} |")
    for impl in ("opd", "opd_full_vocab"):
        if impl in reached and "trl" in reached:
            o, t = reached[impl], reached["trl"]
            print(f"{impl} / TRL: wall time {o[2] / t[2]:.2f}×, student tokens {o[3] / t[3]:.2f}×")
    print("\nseconds per training step (all steps run):")
    for r in results:
        last = r["evals"][-1]
        if last[0]:
            print(f"- {r['impl']}: {last[2] / last[0]:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
