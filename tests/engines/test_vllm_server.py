"""``sampling.engine=vllm_server``, no mocks: a real vLLM server in its own process as the student's engine — one the
user started with the flags docs/engines.md lists, and one opd starts itself — with the weights pushed through files
after every update, a server killed mid-run, and a resume.

The runs that are compared weight for weight send one request at a time (``concurrency=1``): the server's batches,
and so its numbers, are then the same in every run. Needs the optional environment: ``make test-vllm``."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import opd  # noqa: E402
from conftest import final_weights  # noqa: E402
from opd.config.loading import load_config  # noqa: E402
from opd.config.sections import SamplingConfig  # noqa: E402
from opd.engines.vllm_process import free_port  # noqa: E402
from opd.engines.vllm_server import WORKER_EXTENSION, VLLMServerEngine  # noqa: E402
from opd.models.loading import eos_token_ids, load_model, load_tokenizer, resolve_path  # noqa: E402
from opd.models.scoring import rollout_logprobs  # noqa: E402
from opd.training.loop import train  # noqa: E402
from opd.training.stopping import STOPPED_FILE  # noqa: E402
from test_served_outage import kill_after  # noqa: E402
from test_vllm import encode, prompts  # noqa: E402
from vllm_server import VLLMServer  # noqa: E402

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
STUDENT = resolve_path("world:student", "student.path")
STEPS = 4
# what a user adds to serve a student opd pushes weights to (docs/engines.md, "A student engine in its own process")
STUDENT_FLAGS = ["--logprobs-mode", "processed_logprobs", "--worker-extension-cls", WORKER_EXTENSION]


@pytest.fixture(scope="module")
def server():
    server = VLLMServer(STUDENT, name="student", args=STUDENT_FLAGS, env={"VLLM_SERVER_DEV_MODE": "1"}).start()
    yield server
    server.close()


def config(run: Path, *overrides):
    return load_config(ROOT / "configs/demo.yaml", [
        f"run.output_dir={run}", "sampling.engine=vllm_server", "sampling.vllm_server.concurrency=1", "sampling.vllm_server.retries=0",
        "sampling.vllm_server.max_model_len=128", f"train.steps={STEPS}", "train.prompts_per_step=8", "eval.every=0", "eval.num_prompts=16",
        "eval.teacher=false", "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false",
        "log.plot=false", "train.threads=1", *overrides,
    ])


def same(weights: dict, expected: dict) -> bool:
    return weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def whole(server, tmp_path_factory):
    """The weights of a run whose server (the user's) never went away."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(config(run, f"sampling.vllm_server.url={server.url}"))
    return final_weights(run)


def test_after_a_push_the_server_samples_from_the_trainers_weights(server, tmp_path):
    cfg = config(tmp_path / "run", f"sampling.vllm_server.url={server.url}")
    tokenizer, student = load_tokenizer("world:student"), load_model("world:student", "student.path")
    sampler = VLLMServerEngine.build(cfg, student, tokenizer, eos_token_ids(student, tokenizer), None, torch.device("cpu"), 128)
    try:
        sampler.update_weights(student)  # (another test's run may have left its weights there)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        ids, params = encode(tokenizer, prompts(tokenizer, seed=3)), SamplingConfig(temperature=1.0, max_new_tokens=30)

        def gap() -> float:
            rollouts = sampler.sample(ids, params, torch.Generator().manual_seed(3))
            with torch.no_grad():
                trainer_logp_BC, _ = rollout_logprobs(student, rollouts, 1.0)
            mask = rollouts.completion_mask_BC.bool()
            assert mask.sum() > 50
            return float((rollouts.sampler_logp_BC[mask] - trainer_logp_BC[mask]).abs().max())

        assert gap() > 0.05  # the server still holds the checkpoint's weights
        sampler.update_weights(student)
        assert gap() < 1e-3  # and now the trainer's
        unique = {p.data_ptr(): p for p in student.parameters()}.values()  # the tied output layer once
        assert sampler.pushed_bytes == sum(p.numel() * 4 for p in unique)
        assert not list(Path(cfg.sampling.vllm_server.transfer_dir).glob(f"opd-weights-{os.getpid()}-*"))  # the files are gone
    finally:
        sampler.close()


def test_a_lora_students_adapters_are_pushed_as_an_adapter_to_a_server_opd_starts(tmp_path):
    """With ``student.lora.enabled`` opd starts the server with LoRA, and each push loads the adapters in place of the
    last ones: the server then samples the adapted model's distribution (within 1e-3 of the trainer's), not the
    base model's, and the push carries the adapters' bytes only."""
    from test_vllm import change_adapters, lora_student, sample_and_check_the_adapted_model

    cfg = config(tmp_path / "run", "student.lora.enabled=true", "student.lora.r=4", "student.lora.alpha=8")
    tokenizer, student = load_tokenizer("world:student"), lora_student()
    sampler = VLLMServerEngine.build(cfg, student, tokenizer, eos_token_ids(student, tokenizer), None, torch.device("cpu"), 128)
    try:
        change_adapters(student)
        sampler.update_weights(student)
        assert sampler.push_kind == "adapter"
        sample_and_check_the_adapted_model(sampler, student, tokenizer)
        adapters = sum(p.numel() * 4 for n, p in student.named_parameters() if "lora_" in n)
        assert adapters <= sampler.pushed_bytes < adapters + 100_000  # the adapters' file, not the model
    finally:
        sampler.close()


def test_a_server_killed_mid_run_stops_it_with_a_checkpoint_and_the_resume_ends_as_if_it_had_never_gone(server, whole, tmp_path):
    run = tmp_path / "run"
    watcher = kill_after(server, run, 2, restart=False)
    with pytest.raises(opd.Preempted, match=f"an outage of sampling.vllm_server.url \\({server.url}") as stopped:
        train(config(run, f"sampling.vllm_server.url={server.url}"))
    watcher.join()
    done = stopped.value.step
    assert 2 <= done < STEPS and stopped.value.checkpoint.is_dir() and json.loads((run / STOPPED_FILE).read_text())["step"] == done
    server.start()  # the user starts it again: it holds the checkpoint's weights until the resumed run pushes its own
    train(config(run, f"sampling.vllm_server.url={server.url}", "run.resume=true"))
    assert same(final_weights(run), whole)


def test_a_server_opd_starts_trains_like_the_users_and_is_gone_after_the_run(whole, tmp_path):
    port = free_port()
    run = tmp_path / "run"
    train(config(run, f"sampling.vllm_server.port={port}", "sampling.vllm_server.startup_seconds=300"))
    assert same(final_weights(run), whole)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_an_unreachable_server_is_one_line_naming_its_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    args = [f"run.output_dir={tmp_path / 'run'}", "sampling.engine=vllm_server", f"sampling.vllm_server.url={url}", "sampling.vllm_server.retries=0"]
    result = subprocess.run([sys.executable, "-m", "opd", "train", str(ROOT / "configs/demo.yaml"), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("opd:")]
    assert len(lines) == 1 and "sampling.vllm_server.url" in lines[0] and url in lines[0] and "cannot be reached" in lines[0], result.stderr[-2000:]


def test_a_trainer_killed_with_sigkill_takes_the_server_it_started_with_it(tmp_path):
    port, run = free_port(), tmp_path / "run"
    args = [
        f"run.output_dir={run}", "sampling.engine=vllm_server", f"sampling.vllm_server.port={port}", "sampling.vllm_server.max_model_len=128",
        "train.steps=1000", "eval.every=0", "eval.num_prompts=16", "eval.teacher=false", "log.progress_bar=false", "train.threads=1",
    ]
    trainer = subprocess.Popen([sys.executable, "-m", "opd", "train", str(ROOT / "configs/demo.yaml"), *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").exists() and '"kind": "train"' in (run / "metrics.jsonl").read_text()):
            assert trainer.poll() is None and time.time() < deadline
            time.sleep(0.5)
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # its server is up
    finally:
        trainer.kill()
        trainer.wait(30)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.5)
    pytest.fail(f"the server on port {port} outlived its trainer by 60 s")


# ----------------------------------------------------------------------------- generation overlapped with training


def train_metrics(run: Path) -> list[dict]:
    return [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if row["kind"] == "train"]


def test_with_a_lag_a_trainer_killed_mid_step_resumes_to_the_uninterrupted_weights(server, tmp_path):
    """``sampling.max_staleness=2``: step k trains on rows of the weights after step k − 2 (the first steps on the
    start's), generated while earlier steps trained. The trainer is SIGKILLed during step 4 of 6; the checkpoint of
    step 2 holds the rows of steps 3 and 4 generated ahead, so the resumed run ends on the uninterrupted weights."""
    common = [f"sampling.vllm_server.url={server.url}", "sampling.max_staleness=2", "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=5"]
    whole = tmp_path / "whole"
    train(config(whole, *common))
    assert [row["lag"] for row in train_metrics(whole)] == [0, 1, 2, 2, 2, 2]
    assert all(0 <= row["overlap"] <= 1 and row["is_weight_clipped"] <= 1 for row in train_metrics(whole))
    assert (whole / "checkpoints" / "step-000002" / "pending_rows" / "rows.json").is_file()

    run = tmp_path / "run"
    args = [f"run.output_dir={run}", "sampling.engine=vllm_server", "sampling.vllm_server.concurrency=1", "sampling.vllm_server.retries=0",
            "sampling.vllm_server.max_model_len=128", "train.prompts_per_step=8", "eval.every=0", "eval.num_prompts=16", "eval.teacher=false",
            "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false", "train.threads=1", *common]
    trainer = subprocess.Popen([sys.executable, "-m", "opd", "train", str(ROOT / "configs/demo.yaml"), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").exists() and len(train_metrics(run)) >= 3):
            assert trainer.poll() is None and time.time() < deadline
            time.sleep(0.05)
    finally:
        trainer.kill()  # during step 4, with step 5's rows being generated
        trainer.wait(30)
    assert len(train_metrics(run)) < 6
    train(config(run, *common, "run.resume=true"))
    assert same(final_weights(run), final_weights(whole))


@pytest.mark.parametrize("method", ["grpo", "gkd", "opsd", "reopold", "ovd", "opd_plus_jsd"])
def test_every_method_that_samples_the_student_trains_with_a_lag(server, tmp_path, method):
    """GRPO, GKD's on-policy half, OPSD (its teacher the student itself), REOPOLD, OVD (its judge the task's own
    checker) and OPD+ on rows generated one step ahead by the server: each step's rows come from the weights one
    step back, and every loss is finite."""
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/arithmetic" / f"{method}.yaml", [
        f"run.output_dir={run}", "sampling.engine=vllm_server", f"sampling.vllm_server.url={server.url}", "sampling.vllm_server.max_model_len=128",
        "sampling.max_staleness=1", "train.steps=3", "train.prompts_per_step=8", "eval.every=0", "eval.num_prompts=16", "eval.teacher=false",
        "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false", "train.threads=1",
    ])
    train(cfg)
    rows = train_metrics(run)
    assert [row["lag"] for row in rows] == [0, 1, 1] and all(math.isfinite(row["loss"]) for row in rows)


def test_two_ranks_with_a_lag_share_the_server_opd_starts_and_checkpoint_both_ranks_rows(tmp_path):
    """torchrun, 2 ranks, lag 1: rank 0 starts the server and pushes, both ranks generate their own rows ahead, and
    the checkpoint holds each rank's rows of the step after it."""
    from launch import torchrun

    run = tmp_path / "run"
    args = [f"run.output_dir={run}", "sampling.engine=vllm_server", "sampling.max_staleness=1", "sampling.vllm_server.max_model_len=128",
            "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=5", "eval.every=2", "eval.num_prompts=16", "eval.teacher=false",
            "log.progress_bar=false", "log.tensorboard=false", "log.plot=false", "train.threads=1"]
    done = subprocess.run(torchrun(["-m", "opd", "train", str(ROOT / "configs/demo.yaml"), *args]), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["lag"] for row in train_metrics(run)] == [0, 1, 1, 1]
    rows = json.loads((run / "checkpoints" / "step-000002" / "pending_rows" / "rows.json").read_text())["ranks"]
    assert len(rows) == 2 and all(list(rank) == ["2"] for rank in rows)


def test_tool_episodes_run_through_a_server_opd_starts_at_a_lag(tmp_path):
    """The search world's OPD across turns with the student's turns generated by the server engine, one step ahead:
    each turn is a request (stopped at the tool call's closing tag), the search results are spliced in between, and
    the trainer's view of the assembled episodes is the server's. At step 1 (no lag: rows from the weights the trainer
    holds) the truncated importance weight on the agent's tokens is 1 to within 1%, none capped."""
    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/search_qa/demo.yaml", [
        f"run.output_dir={run}", "sampling.engine=vllm_server", "sampling.vllm_server.max_model_len=384", "sampling.max_staleness=1",
        "train.steps=3", "train.prompts_per_step=4", "eval.every=0", "eval.num_prompts=8", "eval.teacher=false", "checkpoint.every=0",
        "checkpoint.at_end=false", "log.progress_bar=false", "log.tensorboard=false", "log.plot=false", "train.threads=1",
    ])
    train(cfg)
    rows = train_metrics(run)
    assert [row["lag"] for row in rows] == [0, 1, 1] and all(math.isfinite(row["loss"]) for row in rows)
    assert all(row["episode_tool_calls"] >= 1 for row in rows)
    assert abs(rows[0]["is_weight_mean"] - 1) < 0.01 and rows[0]["is_weight_clipped"] == 0
