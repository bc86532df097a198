"""Generation overlapped with training: OPD step time with ``sampling.max_staleness=1`` against 0, at V = 151,936.

    .venv-vllm/bin/python benchmarks/bench_overlap.py                 # 3 measured steps per lag (after 1 warm-up step)
    .venv-vllm/bin/python benchmarks/bench_overlap.py --steps 5 --new-tokens 128

Needs the vLLM environment (``make vllm-env``) and at least 2 cores. The same random Llama-style models as
bench_engine.py (a 42M student at Qwen3's vocabulary, a second random model as the teacher). For each lag, one
``opd train`` run with ``sampling.engine=vllm_server``: the trainer pinned to core 0 (``taskset``), the server opd
starts pinned to core 1 (``sampling.vllm_server.cpus``), one torch thread each. Reports the mean seconds per step
and per phase over the measured steps, and with a lag the share of generation hidden behind training
(``overlap`` = 1 − wait / generate, the number that carries over to separate GPUs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import random_model  # noqa: E402
from memory import machine  # noqa: E402

PHASES = ("step_seconds", "time/sample", "time/generate", "time/rollout_wait", "time/sync", "time/teacher", "time/student", "time/optimizer", "overlap")


def run(student: Path, teacher: Path, lag: int, steps: int, new_tokens: int, out: Path) -> dict:
    overrides = [
        f"student.path={student}", f"teacher.path={teacher}", f"train.steps={steps + 1}", "train.prompts_per_step=4",
        "sampling.samples_per_prompt=4", f"sampling.max_new_tokens={new_tokens}", "sampling.engine=vllm_server",
        f"sampling.max_staleness={lag}", "sampling.vllm_server.cpus=[1]", "sampling.vllm_server.max_model_len=1024",
        "train.precision=fp32", "train.threads=1", "eval.every=0", "eval.num_prompts=2", "eval.teacher=false", "eval.max_new_tokens=4",
        "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
        f"run.output_dir={out}",
    ]
    command = ["taskset", "-c", "0", sys.executable, "-m", "opd", "train", str(ROOT / "configs" / "demo.yaml"), *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lag {lag} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["kind"] == "train"][1:]  # the first step warms up (and has nothing to overlap)
    result = {"lag": lag, "steps": len(measured)}
    for key in PHASES:
        values = [r[key] for r in measured if key in r]
        if values:
            result[key] = statistics.mean(values)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student = random_model(tmp / "student", 151_936, 256, 4, 4, seed=0)
        teacher = random_model(tmp / "teacher", 151_936, 256, 4, 4, seed=2)
        results = [run(student, teacher, lag, args.steps, args.new_tokens, tmp / f"lag{lag}") for lag in (0, 1)]
    print(f"\n# OPD at V = 151,936, 16 rows x {args.new_tokens} tokens; trainer on core 0, server on core 1; {machine()}\n")
    print("| lag | s / step | sample (lag 0) | generate (lag 1) | waited | sync | teacher | student | optimizer | overlap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r.get(k, 0.0):.2f}" for k in ("step_seconds", "time/sample", "time/generate", "time/rollout_wait", "time/sync", "time/teacher", "time/student", "time/optimizer")]
        print(f"| {r['lag']} | " + " | ".join(cells) + f" | {r.get('overlap', 0.0):.0%} |")
    print(f"\nlag 1 / lag 0 step time: {results[1]['step_seconds'] / results[0]['step_seconds']:.2f}x")


if __name__ == "__main__":
    main()
