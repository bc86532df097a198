"""One failing rank ends every rank: real ``torchrun`` launches of 2 and 3 ranks on gloo, rank 1's reward function
raising at a step drawn at random. Every process ends within seconds of the failure (not at the process group's
timeout, set to 10 minutes here), the error is printed once, by the failing rank, and rank 0 says which rank failed."""

from __future__ import annotations

import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from launch import opd_train, torchrun

CONFIG = Path(__file__).resolve().parents[2] / "src" / "opd" / "configs" / "demo.yaml"
FAULTY = '''
import os, time
calls = 0

def reward(completion, row):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == {fail_at}:
        open("failed_at", "w").write(repr(time.time()))
        raise RuntimeError("injected failure on call {fail_at}")
    return float(completion.strip().endswith(row["answer"]))
'''
BOUND_S = 15.0  # measured: 1-3 s; without the watchdog torchrun's SIGKILL comes 30 s after its SIGTERM


def alive(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in proc.joinpath("cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_an_error_on_one_rank_ends_every_rank_within_seconds_with_one_message(tmp_path, ranks):
    rows_per_call = 1  # the reward function is called once per sampled row; a step has 4 rows per rank here
    fail_at = random.Random(time.time_ns()).randint(4 * rows_per_call, 4 * 8)  # during one of steps 2-8
    (tmp_path / "faulty.py").write_text(FAULTY.format(fail_at=fail_at))
    run = tmp_path / "run"
    args = [f"run.output_dir={run}", "train.steps=40", "train.prompts_per_step=" + str(ranks), "train.grad_accum=1",
            "sampling.samples_per_prompt=4", "eval.every=0", "eval.num_prompts=6", "eval.teacher=false", "log.progress_bar=false",
            "train.threads=1", "train.dist_timeout=600", "task.reward_function=faulty:reward"]
    launcher = subprocess.Popen(torchrun(opd_train(CONFIG, args), ranks=ranks), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = launcher.communicate(timeout=400)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    ended = time.time()
    assert (tmp_path / "failed_at").exists(), f"rank 1 never failed (call {fail_at}): {stderr[-3000:]}"
    took = ended - float((tmp_path / "failed_at").read_text())
    assert launcher.returncode != 0 and took < BOUND_S, f"{took:.1f} s after the failure (call {fail_at}): {stderr[-3000:]}"
    print(f"{ranks} ranks: every process ended {took:.2f} s after the failure")
    assert alive(str(run)) == []
    assert len(re.findall(r"^RuntimeError: injected failure", stderr, re.M)) == 1, stderr[-4000:]
    assert stderr.count("opd: stopped because rank 1 failed (its error is above)") == 1, stderr[-4000:]
    assert "Connection closed by peer" not in stderr and "ProcessGroupGloo" not in stderr, stderr[-4000:]
