"""Services that go away mid-run: an HTTP judge (OVD) and a Search-R1 retriever (search episodes), real servers on
loopback that are stopped — their port closed, connections refused — and started again on the same port.

Under ``outage=wait`` the run pauses and then goes on; under ``outage=stop`` it stops at the step boundary with a
checkpoint (``opd.Preempted``, exit status 75) and ``--resume`` continues it. Either way the final weights are those of
a run whose service never went away (bit for bit: the services answer deterministically). The outage is set off
during a training step's sampling and, for the retriever, during a mid-run evaluation."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Restartable, final_weights, make_config
from launch import torchrun

import opd
from opd.config.sections import ConfigError
from opd.episodes.search import BM25Index
from opd.services.http import ServiceError
from opd.tasks.search_qa import read_corpus
from opd.training.loop import train
from opd.training.stopping import PREEMPTED_EXIT, STOPPED_FILE
from opd.worlds.locate import world_part

SEARCH_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "search_qa" / "demo.yaml"


def judge_answer(path: str, request: dict) -> dict:
    """A deterministic verbal judge: the score is a function of the request alone."""
    digest = hashlib.sha256(json.dumps(request["messages"]).encode()).digest()
    return {"choices": [{"message": {"role": "assistant", "content": f"Score: {digest[0] % 10}"}}]}


def retriever_answer(index: BM25Index):
    def answer(path: str, request: dict) -> dict:
        hits = [index.search(q, request["topk"]) for q in request["queries"]]
        return {"result": [[{"document": {"id": p.id, "title": p.title, "text": p.text}, "score": p.score} for p in h] for h in hits]}

    return answer


@pytest.fixture(scope="module")
def index():
    return BM25Index(read_corpus(world_part("world:search/corpus.jsonl")))


def train_rows(run: Path) -> int:
    try:
        return sum('"kind": "train"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def judge_config(tmp_path, tiny_models, url: str, run: Path, *overrides):
    return make_config(
        tmp_path, tiny_models, f"run.output_dir={run}", "method.name=ovd", "method.ovd.judge=http", f"method.ovd.http.url={url}",
        "method.ovd.http.retries=0", "method.ovd.http.backoff=0.05", "method.ovd.http.deadline=5", "method.ovd.score_weight=1",
        "train.steps=4", *overrides,
    )


def search_overrides(url: str, run: Path) -> list[str]:
    return [
        f"run.output_dir={run}", "task.corpus=null", f"task.retriever_url={url}/retrieve", "task.retriever_retries=0",
        "train.steps=4", "train.prompts_per_step=4", "eval.num_prompts=4", "eval.every=2", "eval.teacher=false",
        "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false",
        "train.threads=1",
    ]


def search_config(url: str, run: Path, *overrides):
    return opd.load_config(SEARCH_CONFIG, [*search_overrides(url, run), *overrides])


# where each outage begins: the first request once the run has written this many training rows
WHEN = {"a training step": 1, "an evaluation": 2}  # the search runs evaluate after step 2 (eval.every=2), before step 3


def runs(service: str, tmp_path, tiny_models, index):
    """(server, config maker) of one service's runs: ``config(run, *overrides)``."""
    if service == "judge":
        server = Restartable(judge_answer)
        return server, lambda run, *o: judge_config(tmp_path, tiny_models, server.base, run, *o)
    server = Restartable(retriever_answer(index))
    return server, lambda run, *o: search_config(server.base, run, *o)


CASES = [("judge", "a training step"), ("retriever", "a training step"), ("retriever", "an evaluation")]
KEYS = {"judge": "method.ovd.http.", "retriever": "task.retriever_"}


@pytest.mark.slow
@pytest.mark.parametrize("service, where", CASES)
def test_an_outage_is_waited_out_and_the_run_ends_as_if_there_had_been_none(service, where, tmp_path, tiny_models, index, caplog):
    server, config = runs(service, tmp_path, tiny_models, index)
    with server:
        train(config(tmp_path / "whole"))
        server.outage(lambda: train_rows(tmp_path / "run") >= WHEN[where], seconds=2.0)
        with caplog.at_level(logging.WARNING, logger="opd.services.http"):
            train(config(tmp_path / "run", f"{KEYS[service]}outage=wait", f"{KEYS[service]}outage_seconds=60"))
    assert server.outages == 1
    assert "does not answer" in caplog.text and "answers again, after" in caplog.text
    expected, weights = final_weights(tmp_path / "whole"), final_weights(tmp_path / "run")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    start = initial_weights(config(tmp_path / "whole").student.path)
    assert not all(torch.equal(weights[k], start[k]) for k in expected)  # the runs trained: their equality says something


def initial_weights(student_path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(world_part(student_path) or student_path) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("service, where", CASES)
def test_an_outage_under_stop_checkpoints_the_step_boundary_and_resumes_exactly(service, where, tmp_path, tiny_models, index):
    server, config = runs(service, tmp_path, tiny_models, index)
    run = tmp_path / "run"
    with server:
        train(config(tmp_path / "whole"))
        server.outage(lambda: train_rows(run) >= WHEN[where], seconds=None)  # down until the test starts it again
        with pytest.raises(opd.Preempted, match=f"an outage of .*url .*{KEYS[service]}outage=stop") as stopped:
            train(config(run, f"{KEYS[service]}outage=stop"))
        server.start()
        done = WHEN[where]  # the steps behind the failure: the step in progress is given up, the evaluation left to the resume
        assert stopped.value.step == done and stopped.value.checkpoint == run / "checkpoints" / f"step-{done:06d}"
        marker = json.loads((run / STOPPED_FILE).read_text())
        assert marker["exit_status"] == PREEMPTED_EXIT and marker["step"] == done and "an outage of" in marker["reason"]
        train(config(run, f"{KEYS[service]}outage=stop", "run.resume=true"))
    expected, weights = final_weights(tmp_path / "whole"), final_weights(run)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in whole]  # the lost evaluation made up


@pytest.mark.slow
def test_a_judge_outage_under_stop_ends_both_ranks_in_one_checkpoint(tmp_path, tiny_models):
    """Two ranks under torchrun, the judge going down during rank 0's or rank 1's sampling: every rank leaves the
    step together, rank 0 checkpoints its boundary, and the resumed pair ends with the weights of a pair that never
    lost the judge."""
    server = Restartable(judge_answer)
    args = lambda run, *extra: [  # noqa: E731
        f"run.output_dir={run}", f"student.path={tiny_models[1]}", f"teacher.path={tiny_models[0]}", "method.name=ovd",
        "method.ovd.judge=http", f"method.ovd.http.url={server.base}", "method.ovd.http.retries=0", "method.ovd.http.outage=stop",
        "method.ovd.score_weight=1",
        "train.steps=4", "train.prompts_per_step=4", "train.lr=1e-3", "train.precision=fp32", "sampling.samples_per_prompt=2",
        "sampling.max_new_tokens=12", "eval.every=0", "eval.num_prompts=8", "eval.teacher=false", "checkpoint.every=0",
        "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false", "train.threads=1", *extra,
    ]
    config = tmp_path / "ovd.yaml"
    config.write_text("run: {name: ovd}\n")
    launch = lambda *a: subprocess.run(torchrun(["-m", "opd", "train", str(config), *args(*a)]), capture_output=True, text=True, timeout=600)  # noqa: E731
    with server:
        whole = launch(tmp_path / "whole")
        assert whole.returncode == 0, whole.stderr[-3000:]
        run = tmp_path / "run"
        server.outage(lambda: train_rows(run) >= 2, seconds=None)
        stopped = launch(run)
        assert stopped.returncode != 0 and "opd: error" not in stopped.stderr and "HTTP Request" not in stopped.stderr, stopped.stderr[-3000:]
        assert stopped.stderr.count("opd: stopped by an outage of method.ovd.http.url") == 1, stopped.stderr[-3000:]  # rank 0, once
        marker = json.loads((run / STOPPED_FILE).read_text())
        assert marker["step"] == 2 and marker["exit_status"] == PREEMPTED_EXIT and (run / "checkpoints" / "step-000002").is_dir()
        server.start()
        resumed = launch(run, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, weights = final_weights(tmp_path / "whole"), final_weights(run)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_a_retriever_that_never_answered_stops_the_run_in_one_line_naming_it(tmp_path):
    """Down from the start: a configuration mistake, not an outage — one line naming the key and the URL, at once
    (no outage wait), and no checkpoint (nothing was trained)."""
    server = Restartable(lambda path, request: {})
    server.start()
    server.stop()  # a port nothing listens on
    run = tmp_path / "run"
    config = tmp_path / "search.yaml"
    config.write_text(f"base: {SEARCH_CONFIG}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "opd", "train", str(config), *search_overrides(server.base, run)],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("opd:")]
    assert done.returncode == 2 and lines == [line for line in done.stderr.splitlines() if "Traceback" in line or line.startswith("opd:")]
    assert len(lines) == 1 and lines[0].startswith(f"opd: error: task.retriever_url ({server.base}/retrieve): no usable reply after 1 attempts")
    assert not (run / "checkpoints").exists()


def test_a_wait_longer_than_the_ranks_wait_for_each_other_is_refused(tmp_path, tiny_models):
    served = ["teacher.path=null", "teacher.url=http://127.0.0.1:1", "train.dist_timeout=600", "teacher.outage_seconds=900"]
    with pytest.raises(ConfigError, match=r"'teacher.outage_seconds' must be below train.dist_timeout \(600 s\)"):
        make_config(tmp_path, tiny_models, *served)
    make_config(tmp_path, tiny_models, *served, "teacher.outage=stop")  # stop waits for nothing


def test_a_service_error_keeps_its_kind_across_ranks():
    import pickle

    from opd.services.http import OutagePolicy

    outage = OutagePolicy("teacher.url", "teacher.", "wait", 30).gives_up("http://127.0.0.1:1", "connection refused", 31)
    again = pickle.loads(pickle.dumps(outage))
    assert type(again) is type(outage) and str(again) == str(outage) and again.service == "teacher.url" and again.unavailable
    plain = pickle.loads(pickle.dumps(ServiceError("x", transient=True, problem="p", unavailable=True)))
    assert (plain.transient, plain.problem, plain.unavailable) == (True, "p", True)
