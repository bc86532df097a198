"""Preemption: SIGTERM / SIGUSR1 / Ctrl-C and ``run.time_limit`` stop a run between two steps with a checkpoint and
exit status 75, and ``--resume`` then ends with the weights of a run that never stopped (bit for bit on this CPU).

The signals are sent to real processes (``opd train``, and ``torchrun`` launching two ranks) at points drawn at
random: before the first step, during and after a checkpoint write, after a random step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import final_weights, make_config
from launch import ok, opd_train, torchrun

from opd.config.sections import ConfigError, parse_duration
from opd.training.stopping import PREEMPTED_EXIT, Preempted, StopRequests

CONFIG = Path(__file__).resolve().parents[2] / "src" / "opd" / "configs" / "demo.yaml"
STEPS = 12
ARGS = [f"train.steps={STEPS}", "checkpoint.every=4", "eval.every=0", "eval.num_prompts=16", "log.progress_bar=false",
        "log.plot=false", "train.threads=1"]


def single_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def launch(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=single_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def train_rows_written(run: Path) -> int:
    try:
        return sum('"kind": "train"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the signal: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "the run never reached the point of the signal"
        time.sleep(0.005)


def points(run: Path, rng: random.Random) -> dict:
    """Where to send the signal, each a test of when the run is ready for it."""
    checkpoints = run / "checkpoints"
    step = rng.randint(1, STEPS - 2)
    return {
        "before the first step": lambda: (run / "config.yaml").exists(),
        "during a checkpoint write": lambda: any(checkpoints.glob(".tmp-step-*")) or (checkpoints / "step-000004").exists(),
        "after a checkpoint write": lambda: (checkpoints / "step-000008").exists(),
        f"after step {step}": lambda: train_rows_written(run) >= step,
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run([sys.executable, *opd_train(CONFIG, [*ARGS, f"run.output_dir={run}"])], env=single_env(),
                          capture_output=True, text=True, timeout=600)
    ok(done)
    return final_weights(run)


def stopped_step(stderr: str, signame: str) -> int:
    line = next(line for line in stderr.splitlines() if line.startswith(f"opd: stopped by {signame}"))
    return int(line.split(" after ")[1].split()[0])


@pytest.mark.slow
def test_sigterm_at_any_point_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, uninterrupted):
    seed = time.time_ns()
    rng = random.Random(seed)
    for where, ready in points(tmp_path / "probe", rng).items():
        run = tmp_path / where.replace(" ", "_")
        ready = points(run, random.Random(seed))[where]
        proc = launch([sys.executable, *opd_train(CONFIG, [*ARGS, f"run.output_dir={run}"])])
        wait_for(proc, ready)
        time.sleep(rng.uniform(0, 0.3) if where.startswith("after") else 0)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == PREEMPTED_EXIT, f"{where} (seed {seed}): {stderr[-2000:]}"
        step = stopped_step(stderr, "SIGTERM")
        assert step < STEPS and (run / "checkpoints" / f"step-{step:06d}").is_dir(), where
        assert "Traceback" not in stderr, stderr[-2000:]
        resumed = subprocess.run([sys.executable, *opd_train(CONFIG, [*ARGS, f"run.output_dir={run}", "--resume"])],
                                 env=single_env(), capture_output=True, text=True, timeout=600)
        ok(resumed)
        weights = final_weights(run)
        assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted), f"{where}: stopped after {step} (seed {seed})"


@pytest.mark.slow
def test_a_signal_to_torchrun_reaches_both_ranks_and_ends_in_one_checkpoint(tmp_path):
    args = [*ARGS, "train.prompts_per_step=16", "train.grad_accum=2"]
    reference = tmp_path / "reference"
    ok(subprocess.run(torchrun(opd_train(CONFIG, [*args, f"run.output_dir={reference}"])), capture_output=True, text=True, timeout=600))
    run = tmp_path / "run"
    step = random.Random(time.time_ns()).randint(1, STEPS - 2)
    launcher = subprocess.Popen(torchrun(opd_train(CONFIG, [*args, f"run.output_dir={run}"])), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    wait_for(launcher, lambda: train_rows_written(run) >= step)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode != 0
    assert stderr.count("opd: stopped by SIGTERM") == 1, stderr[-3000:]  # rank 0 says it, once
    stopped = stopped_step(stderr, "SIGTERM")
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")][-1:] != [] and (
        run / "checkpoints" / f"step-{stopped:06d}").is_dir()
    marker = json.loads((run / "stopped.json").read_text())  # what a batch script reads: torchrun itself exits 1
    assert marker["step"] == stopped and marker["exit_status"] == PREEMPTED_EXIT and marker["reason"] == "SIGTERM"
    ok(subprocess.run(torchrun(opd_train(CONFIG, [*args, f"run.output_dir={run}", "--resume"])), capture_output=True, text=True, timeout=600))
    assert not (run / "stopped.json").exists()
    expected, weights = final_weights(reference), final_weights(run)
    assert all(torch.equal(weights[k], expected[k]) for k in expected), f"stopped after {stopped}"


@pytest.mark.slow
def test_the_time_limit_stops_before_it_is_reached_and_resumes_exactly(tmp_path, tiny_models):
    """A limit of half the time the whole run took: the run stops resumably before the limit, then resumes to the
    whole run's weights."""
    import opd
    from opd.training.loop import train

    overrides = ["train.steps=150", "checkpoint.every=0", "checkpoint.at_end=true"]
    started = time.time()
    train(make_config(tmp_path, tiny_models, *overrides, "run.output_dir=" + str(tmp_path / "whole")))
    limit = (time.time() - started) / 2
    started = time.time()
    with pytest.raises(opd.Preempted) as stopped:
        train(make_config(tmp_path, tiny_models, *overrides, f"run.output_dir={tmp_path / 'run'}", f"run.time_limit={limit:.3f}s"))
    assert time.time() - started < limit and stopped.value.reason == "run.time_limit"
    assert 0 < stopped.value.step < 150 and stopped.value.checkpoint.is_dir()
    train(make_config(tmp_path, tiny_models, *overrides, f"run.output_dir={tmp_path / 'run'}", "run.resume=true"))
    expected, weights = final_weights(tmp_path / "whole"), final_weights(tmp_path / "run")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------- in this process


def test_ctrl_c_stops_after_the_step_and_a_second_one_stops_at_once(monkeypatch):
    import opd.training.stopping as stopping
    from opd.parallel.ranks import SINGLE

    monkeypatch.setattr(stopping, "SECOND_INTERRUPT_S", 0.05)
    stops = StopRequests().install()
    try:
        assert stops.reason(SINGLE) is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.reason(SINGLE) == "SIGINT (Ctrl-C)"
        os.kill(os.getpid(), signal.SIGINT)  # at once: a launcher forwarding the same Ctrl-C, not a second one
        time.sleep(0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.reason(SINGLE) == "SIGTERM"
    finally:
        stops.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_stop_before_the_first_step_checkpoints_step_zero_and_resumes_exactly(tmp_path, tiny_models, monkeypatch):
    """In one process: a signal already received when the loop starts stops it at step 0, with a checkpoint that
    resumes into the run that never stopped."""
    import opd.training.loop as loop
    from opd.training.loop import train

    train(make_config(tmp_path, tiny_models, "run.output_dir=" + str(tmp_path / "whole")))
    stops = StopRequests(received=3)  # SIGTERM, received while the models loaded
    monkeypatch.setattr(loop, "StopRequests", lambda *a, **k: stops)
    with pytest.raises(Preempted) as stopped:
        train(make_config(tmp_path, tiny_models, "run.output_dir=" + str(tmp_path / "run")))
    monkeypatch.undo()
    assert stopped.value.step == 0 and stopped.value.reason == "SIGTERM" and stopped.value.checkpoint.is_dir()
    train(make_config(tmp_path, tiny_models, "run.output_dir=" + str(tmp_path / "run"), "run.resume=true"))
    expected, weights = final_weights(tmp_path / "whole"), final_weights(tmp_path / "run")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.parametrize("text, seconds", [("3h50m", 13800), ("90m", 5400), ("45s", 45), ("1d2h", 93600), ("3600", 3600), (120, 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_a_time_limit_that_is_no_duration_is_one_line(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match=r"^config key 'run.time_limit': '3 hours' is not a duration"):
        make_config(tmp_path, tiny_models, "run.time_limit=3 hours")
    with pytest.raises(ConfigError, match=r"^config key 'run.time_limit' must be a positive duration"):
        make_config(tmp_path, tiny_models, "run.time_limit=0")
