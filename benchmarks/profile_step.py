"""Where a training step's time goes: the share of sampling, teacher scoring, student forward + backward and optimizer.

    python benchmarks/profile_step.py                                # OPD (the demo), GKD, GRPO, OVD; 40 steps each
    python benchmarks/profile_step.py --configs configs/demo.yaml --steps 100

Runs each config for ``--steps`` steps on the embedded world (no evaluation during
training) and prints the phase totals opd's loop records in ``summary.json``
(``phase_seconds``; see docs/architecture.md, "Where the time goes").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import machine  # noqa: E402

from opd.config.loading import load_config  # noqa: E402
from opd.training.loop import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/demo.yaml", "configs/arithmetic/gkd.yaml", "configs/arithmetic/grpo.yaml", "configs/arithmetic/ovd.yaml"]
PHASES = ["sample", "sync", "teacher", "judge", "student", "reduce", "optimizer"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("overrides", nargs="*", help="key=value config overrides applied to every run")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(args.configs):
            overrides = [
                f"train.steps={args.steps}", "eval.every=0", "eval.num_prompts=32", "eval.teacher=false",
                "log.progress_bar=false", "log.plot=false", "log.tensorboard=false", f"run.output_dir={tmp}/{i}",
                *args.overrides,
            ]
            summary = train(load_config(ROOT / path, overrides))
            rows.append((path, summary))
    print(f"# step profile — {machine()}; {args.steps} steps per config\n")
    print("| config | method | s/step | " + " | ".join(PHASES) + " |")
    print("|---|---|---|" + "---|" * len(PHASES))
    for path, summary in rows:
        seconds, shares = summary["phase_seconds"], summary["phase_shares"]
        per_step = sum(seconds.values()) / args.steps
        cells = [f"{shares[name]:.0%}" if name in shares else "—" for name in PHASES]
        print(f"| `{path}` | {summary['method']} | {per_step:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
