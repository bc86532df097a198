"""Two runs never share a run directory: a real second process is refused naming the holder's pid and the first run
finishes intact; a killed holder leaves no stale lock."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from opd.training.run_lock import LOCK_NAME, RunDirBusy, RunDirLock


def run_args(tmp_path, tiny_models, steps):
    teacher, student = tiny_models
    return [
        sys.executable, "-m", "opd", "train", str(tmp_path / "cfg.yaml"), f"run.output_dir={tmp_path / 'run'}",
        f"student.path={student}", f"teacher.path={teacher}", f"train.steps={steps}", "train.prompts_per_step=2",
        "sampling.max_new_tokens=8", "eval.every=0", "eval.num_prompts=4", "eval.teacher=false", "log.progress_bar=false",
        "log.tensorboard=false", "log.plot=false", "train.threads=1",
    ]


def wait_for_lock_holder(path, pid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip() == str(pid):
            return
        time.sleep(0.05)
    raise AssertionError("the first run never took the lock")


@pytest.mark.slow  # two real training processes: about 8 s
def test_a_second_run_into_the_same_directory_is_refused_and_the_first_is_intact(tmp_path, tiny_models):
    (tmp_path / "cfg.yaml").write_text("run: {name: lock}\n")
    first = subprocess.Popen(run_args(tmp_path, tiny_models, 40), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_lock_holder(tmp_path / "run" / LOCK_NAME, first.pid)
    second = subprocess.run(run_args(tmp_path, tiny_models, 3) + ["run.overwrite=true"], capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first run should still be running when the second is refused"
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert lines[-1] == (
        f"opd: error: run.output_dir '{tmp_path / 'run'}' is in use by another opd run (pid {first.pid}); "
        "wait for it to finish or choose another run.output_dir"
    )
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 41))  # one run's rows, none interleaved
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 40


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = f"from opd.training.run_lock import RunDirLock; lock = RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); import time; time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
        RunDirLock(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with RunDirLock(tmp_path):  # the kernel released it with the process
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
