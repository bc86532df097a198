"""FSDP2 sharding against data parallel: what each of 2 CPU ranks holds, its peak memory, and the step time.

    .venv/bin/python benchmarks/bench_sharding.py            # 2 ranks (gloo), 1 thread each, both settings

One random Llama student (``--hidden`` wide, ``--layers`` deep, the embedded char tokenizer) distils
from a copy of itself with OPD (or ``--method gkd``: the fused full-vocabulary loss) on the arithmetic task, ``--steps`` steps, launched with ``torchrun
--nproc_per_node 2`` twice: ``train.sharding=none`` (every rank holds the whole student, its gradients
and Adam state) and ``train.sharding=fsdp``. Per rank it reports the training state it holds between
steps (parameters + gradients + Adam's two moments, float32, counted from the local shards), its peak
resident memory (``ru_maxrss``: this includes the whole model each rank loads before sharding and the
whole model gathered for sampling) and the mean step time. The ratios are fsdp / none from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import machine  # noqa: E402


def worker(args) -> None:
    """One rank: train, then write what this rank held and its peak memory beside the run."""
    import torch

    import opd.training.loop as train_module
    from opd.config.loading import load_config
    from opd.parallel.sharding import local_part
    from opd.training import assembly

    held: dict = {}
    build = assembly.build_session

    def measured_build(cfg, ranks):
        session = build(cfg, ranks)
        held["elements"] = sum(local_part(p).numel() for p in session.student.parameters() if p.requires_grad)
        return session

    train_module.build_session = measured_build
    config = [o.removeprefix("--config=") for o in args.overrides if o.startswith("--config=")][0]
    cfg = load_config(ROOT / "configs" / config, [o for o in args.overrides if not o.startswith("--config=")])
    summary = train_module.train(cfg)
    rank = int(os.environ["RANK"])
    state_bytes = held["elements"] * 4 * 4  # float32 parameter, gradient, exp_avg, exp_avg_sq
    Path(cfg.run.output_dir, f"bench-rank{rank}.json").write_text(json.dumps({
        "rank": rank, "state_mib": state_bytes / 2**20, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_seconds": summary["train_seconds"] / max(1, summary["steps"]), "phase_seconds": summary["phase_seconds"],
        "threads": torch.get_num_threads(),
    }))


CONFIGS = {"opd": "demo.yaml", "gkd": "arithmetic/gkd.yaml"}  # gkd: the fused full-vocabulary loss on the gathered output layer


def launch(sharding: str, student: Path, out: Path, steps: int, method: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [
        f"student.path={student}", f"teacher.path={student}", f"run.output_dir={out}", f"train.steps={steps}",
        "train.prompts_per_step=4", "train.precision=fp32", "train.threads=1", "sampling.samples_per_prompt=2",
        "sampling.max_new_tokens=32", "eval.every=0", "eval.num_prompts=2", "eval.teacher=false", "checkpoint.every=0",
        "checkpoint.at_end=false", "log.progress_bar=false", "log.plot=false", "log.tensorboard=false", f"train.sharding={sharding}",
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
        __file__, "--worker", f"--config={CONFIGS[method]}", *overrides,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{sharding} run failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"bench-rank{rank}.json").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--method", choices=sorted(CONFIGS), default="opd")
    args, overrides = parser.parse_known_args()
    if args.worker:
        args.overrides = overrides
        return worker(args)
    from opd.worlds.arithmetic import ModelShape, WorldSpec
    from opd.worlds.build.common import init_model
    from opd.worlds.tokenizer import build_char_tokenizer

    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        shape = ModelShape(args.hidden, args.layers, 4 * args.hidden, max(1, args.hidden // 64))
        student = init_model(Path(tmp) / "student", shape, build_char_tokenizer(), WorldSpec(max_positions=256), seed=0)
        results = {sharding: launch(sharding, student, Path(tmp) / sharding, args.steps, args.method) for sharding in ("none", "fsdp")}
    print(f"student: hidden {args.hidden}, {args.layers} layers; 2 ranks x 1 thread (gloo); {args.method.upper()}, {args.steps} steps of 4 prompts x 2 samples x 32 tokens")
    print("| sharding | rank | training state held (MiB) | peak RSS (MiB) | step (s) |")
    print("|---|---|---|---|---|")
    for sharding, rows in results.items():
        for r in rows:
            print(f"| {sharding} | {r['rank']} | {r['state_mib']:.1f} | {r['peak_rss_mib']:.0f} | {r['step_seconds']:.2f} |")
    none, fsdp = results["none"][0], results["fsdp"][0]
    print(
        f"rank 0, fsdp / none: state {fsdp['state_mib'] / none['state_mib']:.2f}x, peak RSS {fsdp['peak_rss_mib'] / none['peak_rss_mib']:.2f}x, "
        f"step time {fsdp['step_seconds'] / none['step_seconds']:.2f}x"
    )
    for sharding, rows in results.items():
        print(f"{sharding} rank 0 phase seconds: {rows[0]['phase_seconds']}")


if __name__ == "__main__":
    main()
