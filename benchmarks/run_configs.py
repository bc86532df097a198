"""Run configs (default: configs/demo.yaml and every configs/arithmetic/*.yaml) and record accuracy, wall time and a
hash of the final weights, one JSON line per config — the before/after check of a change that should (or should
not) move the numbers: bit-equal weights mean the computation did not change.

    python benchmarks/run_configs.py OUT.jsonl [CONFIG ...] [-- key=value ...]

Run from the repository root; run directories go under /tmp/runcfg/<OUT's stem>/.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from opd.config.loading import load_config
from opd.training.loop import train

args = sys.argv[1:]
out = Path(args.pop(0))
overrides = []
if "--" in args:
    i = args.index("--")
    overrides, args = args[i + 1 :], args[:i]
configs = args or ["configs/demo.yaml"] + sorted(str(p) for p in Path("configs/arithmetic").glob("*.yaml"))
for path in configs:
    name = Path(path).stem
    run_dir = f"/tmp/runcfg/{out.stem}/{name}"
    started = time.time()
    cfg = load_config(path, [f"run.output_dir={run_dir}", "run.overwrite=true", "log.progress_bar=false", "log.plot=false", "log.tensorboard=false", *overrides])
    summary = train(cfg)
    tensors = load_file(f"{run_dir}/final/model.safetensors")
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].float().numpy().tobytes())
    row = {"config": path, "before": summary["student_accuracy_before"], "after": summary["student_accuracy_after"],
           "seconds": round(time.time() - started, 1), "weights_sha": digest.hexdigest()[:16]}
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
