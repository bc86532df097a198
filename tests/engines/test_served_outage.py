"""A served teacher that goes away mid-run: a stock vLLM server SIGKILLed while a run scores with it, then started
again on the same port. Under ``teacher.outage=wait`` the step pauses until the server is back and the run goes on;
under ``stop`` it stops at the step boundary with a checkpoint (``opd.Preempted``) and ``--resume`` continues it. Both
end with the weights of a run whose server never went away (one request at a time: the server's batches, and so its
numbers, are the same in every run).

Needs the optional environment: ``make test-vllm``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import opd  # noqa: E402
from conftest import final_weights  # noqa: E402
from opd.config.loading import load_config  # noqa: E402
from opd.models.loading import resolve_path  # noqa: E402
from opd.training.loop import train  # noqa: E402
from opd.training.metrics import MetricsLog  # noqa: E402
from opd.training.stopping import STOPPED_FILE  # noqa: E402
from vllm_server import VLLMServer  # noqa: E402

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
STARTUP_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="module")
def server():
    server = VLLMServer(resolve_path("world:teacher", "teacher.path")).start()
    yield server
    server.close()


def config(server, run: Path, *overrides):
    return load_config(ROOT / "configs/demo.yaml", [
        f"run.output_dir={run}", "teacher.path=null", f"teacher.url={server.url}", "teacher.concurrency=1", "teacher.retries=0",
        f"train.steps={STEPS}", "train.prompts_per_step=8", "eval.every=0", "eval.num_prompts=16", "eval.teacher=false",
        "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
        "train.threads=1", *overrides,
    ])


def train_rows(run: Path) -> int:
    try:
        return sum('"kind": "train"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_after(server: VLLMServer, run: Path, rows: int, restart: bool) -> threading.Thread:
    """Once ``run`` has logged ``rows`` steps: SIGKILL the server (and start it again, when ``restart``). For a run in
    other processes (torchrun); an in-process run uses ``kill_at_row``, which cannot lose the race."""

    def watch():
        while train_rows(run) < rows:
            time.sleep(0.01)
        server.kill()
        if restart:
            server.start()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def kill_at_row(monkeypatch, server: VLLMServer, rows: int, restart: bool) -> list[threading.Thread]:
    """SIGKILL the server inside the in-process run, right after it writes its ``rows``-th training row: the next
    step meets the outage whatever the machine's speed (a watcher thread polling the file can be scheduled late
    enough for the run to finish first; seen in CI). With ``restart``, a thread starts the server again (appended to
    the list returned when the kill happens)."""
    write, restarter = MetricsLog.write, []

    def write_then_kill(self, kind, step, values):
        write(self, kind, step, values)
        if kind == "train" and step == rows:
            server.kill()
            if restart:
                restarter.append(threading.Thread(target=server.start, daemon=True))
                restarter[0].start()

    monkeypatch.setattr(MetricsLog, "write", write_then_kill)
    return restarter


@pytest.fixture(scope="module")
def whole(server, tmp_path_factory):
    run = tmp_path_factory.mktemp("whole") / "run"
    train(config(server, run))
    return final_weights(run)


def same(weights: dict, expected: dict) -> bool:
    return all(torch.equal(weights[k], expected[k]) for k in expected)


def test_the_run_waits_for_a_killed_server_to_come_back_and_ends_as_if_it_had_never_gone(server, whole, tmp_path, caplog, monkeypatch):
    run = tmp_path / "run"
    restarter = kill_at_row(monkeypatch, server, 2, restart=True)
    with caplog.at_level(logging.WARNING, logger="opd.services.http"):
        summary = train(config(server, run, "teacher.outage=wait", "teacher.outage_seconds=600"))
    restarter[0].join()
    assert "teacher.url" in caplog.text and "does not answer" in caplog.text and "answers again, after" in caplog.text
    assert summary["nonfinite_skips"] == 0 and same(final_weights(run), whole)


def test_stop_checkpoints_the_step_boundary_and_the_resume_ends_as_if_the_server_had_never_gone(server, whole, tmp_path, monkeypatch):
    run = tmp_path / "run"
    kill_at_row(monkeypatch, server, 2, restart=False)
    try:
        with pytest.raises(opd.Preempted, match=f"an outage of teacher.url \\({server.url}/v1/completions\\)") as stopped:
            train(config(server, run, "teacher.outage=stop"))
    finally:
        monkeypatch.undo()
        server.start()  # up again for the resume, and for the tests after this one whatever happened here
    done = stopped.value.step
    assert done == 2 and stopped.value.checkpoint.is_dir() and json.loads((run / STOPPED_FILE).read_text())["step"] == done
    train(config(server, run, "teacher.outage=stop", "run.resume=true"))
    assert same(final_weights(run), whole)


def test_two_sharded_ranks_leave_the_step_together_and_resume_exactly(server, tmp_path):
    """FSDP over 2 ranks under torchrun, the server killed mid-run: the rank whose scoring failed gives NaN, every rank
    runs the step's collectives to the end and skips it together, rank 0 gathers the checkpoint of its boundary, and
    the resumed pair ends with the weights of a pair whose server stayed up."""
    from launch import torchrun

    def launch(run: Path, *extra) -> subprocess.CompletedProcess:
        args = [
            f"run.output_dir={run}", "teacher.path=null", f"teacher.url={server.url}", "teacher.concurrency=1", "teacher.retries=0",
            "teacher.outage=stop", f"train.steps={STEPS}", "train.prompts_per_step=8", "train.sharding=fsdp", "eval.every=0",
            "eval.num_prompts=16", "eval.teacher=false", "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false",
            "log.tensorboard=false", "log.plot=false", "train.threads=1", *extra,
        ]
        command = torchrun(["-m", "opd", "train", str(ROOT / "configs/demo.yaml"), *args])
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a rank that aborts prints where it was
        rows = train_rows(run)
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        if result.returncode and STARTUP_ABORT in result.stderr and train_rows(run) == rows:
            # seen once in five local runs of this file, never in fifteen launches alone: a rank aborting in C++ before
            # its first step (no row written); launched once more, and the abort is reported
            warnings.warn(f"a rank aborted at start ({STARTUP_ABORT!r}); launched again:\n{result.stderr[-1500:]}")
            result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        return result

    reference = launch(tmp_path / "whole")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "run"
    watcher = kill_after(server, run, 2, restart=False)
    try:
        stopped = launch(run)
        watcher.join(timeout=60)
    finally:
        server.start()  # up again for the resume whatever happened (a no-op where the watcher never killed it)
    assert stopped.stderr.count("opd: stopped by an outage of teacher.url") == 1, stopped.stderr[-3000:]
    done = json.loads((run / STOPPED_FILE).read_text())["step"]
    assert 2 <= done < STEPS and (run / "checkpoints" / f"step-{done:06d}").is_dir()
    resumed = launch(run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same(final_weights(run), final_weights(tmp_path / "whole"))
