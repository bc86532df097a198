"""The benchmarks run end to end at toy sizes: the loss benchmark's rows agree with the materialised baseline, and the
GPU check runs on this CPU."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 8 s: the default suite keeps to about a minute
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


@pytest.mark.slow
def test_the_gpu_check_runs_at_tiny_sizes_without_a_gpu(tmp_path):
    """make gpu-check's script end to end on this CPU: every part's rows, and the same step with and without
    gradient checkpointing (the same loss: checkpointing recomputes, it does not change the computation)."""
    out = tmp_path / "gpu_check.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)], capture_output=True, text=True, check=True)
    table = out.read_text()
    steps = re.findall(r"^\| (opd|gkd) \| (on|off) \| .* \| ([\d.]+) \|$", table, re.M)
    assert sorted((m, c) for m, c, _ in steps) == [("gkd", "off"), ("gkd", "on"), ("opd", "off"), ("opd", "on")]
    losses = {(m, c): float(loss) for m, c, loss in steps}
    for method in ("opd", "gkd"):
        assert losses[(method, "on")] == pytest.approx(losses[(method, "off")], rel=1e-4)
    assert re.search(r"^\| opd \| [\d.]+ GiB \| [\d.]+ s \|$", table, re.M) and re.search(r"^\| materialised \| ", table, re.M)
    assert re.search(r"^\| opd HF sampler \(KV cache\) \| [\d,]+ \| ", table, re.M)


@pytest.mark.slow  # 4 s
def test_bench_cross_tokenizer_runs_and_the_bpe_teacher_reads_fewer_tokens(tmp_path):
    out = tmp_path / "cross.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_cross_tokenizer.py"), "--rows", "2", "--tokens", "64", "--repeats", "1",
           "--hidden", "16", "--threads", "1", "--out", str(out)]
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    results = json.loads(out.read_text())
    assert all(results[f"{path}_s"] > 0 for path in ("shared", "own_same", "own_bpe", "align_same", "align_bpe"))
    assert results["bpe_tokens_per_char"] < 1.0 and "own_bpe" in printed
