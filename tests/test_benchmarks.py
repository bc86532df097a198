"""The loss benchmark runs end to end at a toy size and its rows agree with the materialised baseline."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_loss_runs_and_agrees_with_the_baseline(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "bench_loss.py"),
        "--vocab", "512", "--tokens", "64", "--hidden", "32", "--impls", "opd", "materialised", "--json", str(out),
    ]
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {row["impl"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"opd", "materialised"}
    opd = rows["opd"]
    assert opd["seconds"] > 0 and opd["peak_bytes"] >= 0
    for key in ("loss_rel_err", "grad_h_rel_err", "grad_w_rel_err"):
        assert opd[key] < 1e-5
    assert "opd_time_ratio" in rows["materialised"] and "| 512 | 64 | opd |" in printed
