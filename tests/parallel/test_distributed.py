"""One run across several processes: real ``torchrun`` launches of ``opd train`` on CPU (gloo), 2 ranks.

The claim under test: with ranks × grad_accum micro-batches per step, 2 ranks × 1 micro-batch take exactly
the optimizer steps of 1 process × 2 accumulated micro-batches (same prompts, same sampling noise, one
normaliser for the step, gradients summed), rank 0 alone writes, and a run with a rank killed by SIGKILL
resumes to the weights of an uninterrupted 2-rank run. The pure pieces (metric merging, buckets, the
config checks) are tested without processes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_config
from launch import kill_rank_one_after, ok, one_process, two_ranks
from safetensors.torch import load_file

from opd.config.sections import ConfigError
from opd.objectives.common import step_normaliser
from opd.parallel.ranks import gradient_buckets, merge_rank_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "opd" / "configs"


# ----------------------------------------------------------------------------- without processes


def test_metrics_from_ranks_add_the_step_totals_and_average_the_rest():
    # rank 0 ran two micro-batches, one of them reporting x; rank 1 two, both reporting it
    rank0 = ({"loss": 0.25, "kl": 2.0, "student_tokens": 10, "x": 1.0}, {"loss": 2, "kl": 2, "student_tokens": 2, "x": 1})
    rank1 = ({"loss": 0.5, "kl": 6.0, "student_tokens": 6, "x": 8.0}, {"loss": 2, "kl": 2, "student_tokens": 2, "x": 2})
    merged = merge_rank_metrics([rank0, rank1], ("loss", "student_tokens"))
    assert merged == {"loss": 0.75, "kl": 2.0, "student_tokens": 16, "x": 3.0}  # x: (1 + 8) / 3 micro-batches


def test_gradient_buckets_keep_order_dtype_and_size():
    grads = [torch.zeros(3), torch.zeros(4), torch.zeros(2, dtype=torch.float64), torch.zeros(9), torch.zeros(1)]
    buckets = gradient_buckets(grads, limit=8)
    assert [[g.numel() for g in b] for b in buckets] == [[3, 4], [2], [9], [1]]
    assert [g for b in buckets for g in b] == grads


def test_the_step_normaliser_counts_every_ranks_tokens():
    mask_rank0, mask_rank1 = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    one_process = step_normaliser([mask_rank0, mask_rank1], "token_mean")
    other_rank = float(mask_rank1.sum())
    rank0 = step_normaliser([mask_rank0], "token_mean", total=lambda local: local + other_rank)
    assert rank0.denominator == one_process.denominator == 6.0


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_naming_the_key(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"train\.prompts_per_step.*3 ranks"):
        make_config(tmp_path, tiny_models, "train.prompts_per_step=4")


def test_one_explicit_gpu_for_every_rank_is_refused(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"train\.device.*one device for all 2 ranks"):
        make_config(tmp_path, tiny_models, "train.device=cuda:1")


@pytest.mark.parametrize("world, size, key", [
    ("1", 2, r"sampling\.vllm\.tensor_parallel_size' is 2, which shards the engine over 2 ranks of a launch .*this run is one process"),
    ("4", 3, r"sampling\.vllm\.tensor_parallel_size' is 3, which does not divide the launch's 4 ranks"),
    ("2", 0, r"sampling\.vllm\.tensor_parallel_size' must be >= 1, got 0"),
], ids=["one-process", "not-a-divisor", "zero"])
def test_vllm_engine_groups_that_do_not_fit_the_launch_are_refused(tmp_path, tiny_models, monkeypatch, world, size, key):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=key):
        make_config(tmp_path, tiny_models, "sampling.engine=vllm", f"sampling.vllm.tensor_parallel_size={size}")


def test_an_accelerate_fsdp_launch_without_sharding_is_refused_naming_the_key(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"configured for FSDP but train\.sharding is 'none'.*set train\.sharding=fsdp"):
        make_config(tmp_path, tiny_models)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert make_config(tmp_path, tiny_models, "train.sharding=fsdp").train.sharding == "fsdp"  # the plugin asked for it


def test_an_accelerate_deepspeed_launch_is_refused(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="configured for DeepSpeed, which opd does not support"):
        make_config(tmp_path, tiny_models)


def test_fsdp_in_one_process_is_refused_naming_the_key(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match=r"train\.sharding.*one process has nothing to shard over"):
        make_config(tmp_path, tiny_models, "train.sharding=fsdp")


@pytest.mark.parametrize("overrides, key", [
    (("student.lora.enabled=true",), r"train\.sharding.*LoRA"),
    (("method.name=opsd", "teacher.path=null", "method.opsd.teacher_weights=ema"), r"method\.opsd\.teacher_weights.*'ema'"),
], ids=["lora", "opsd-ema"])
def test_what_fsdp_does_not_shard_yet_is_refused_before_any_model(tmp_path, tiny_models, monkeypatch, overrides, key):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=key):
        make_config(tmp_path, tiny_models, "train.sharding=fsdp", *overrides)


def test_a_checkpoint_of_other_micro_batches_is_refused_unless_allowed(tmp_path, tiny_models):
    from opd.training.resume import RunDirError, check_micro_batches

    cfg = make_config(tmp_path, tiny_models)
    with pytest.raises(RunDirError, match=r"written with 2 micro-batches per step .* this resume has 1; launch it with ranks x train.grad_accum = 2"):
        check_micro_batches(cfg, 2, 1, tmp_path / "step-000002")
    check_micro_batches(make_config(tmp_path, tiny_models, "run.allow_changes=true"), 2, 1, tmp_path / "step-000002")


# ----------------------------------------------------------------------------- real processes


def run_args(tiny_models, out: Path, *extra: str) -> list[str]:
    teacher, student = tiny_models
    return [
        f"student.path={student}", f"teacher.path={teacher}", f"run.output_dir={out}", "train.prompts_per_step=4", "train.lr=1e-3",
        "train.precision=fp32", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=12", "eval.every=0", "eval.num_prompts=8",
        "eval.teacher=false", "checkpoint.every=0", "checkpoint.at_end=false", "log.progress_bar=false", "log.plot=false",
        "log.tensorboard=false", *extra,
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def train_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


LORA_DROPOUT = ("student.lora.enabled=true", "student.lora.dropout=0.3", "train.lr=1e-2")  # dropout draws from torch's global RNG


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("opd", ()), ("gkd", ()), ("reopold", ()), ("opd", LORA_DROPOUT)], ids=["opd", "gkd", "reopold", "opd-lora-dropout"])
def test_two_ranks_take_the_steps_of_one_process_accumulating_both_halves(tmp_path, tiny_models, method, extra):
    config = CONFIGS / ("demo.yaml" if method == "opd" else f"arithmetic/{method}.yaml")
    single, ranks = tmp_path / "one", tmp_path / "two"
    ok(one_process(config, run_args(tiny_models, single, "train.steps=3", "train.grad_accum=2", *extra)))
    ok(two_ranks(config, run_args(tiny_models, ranks, "train.steps=3", "train.grad_accum=1", "log.tensorboard=true", *extra)))
    assert max_relative_difference(weights(ranks), weights(single)) <= 1e-5
    one, two = train_rows(single), train_rows(ranks)
    assert [r["step"] for r in two] == [1, 2, 3]  # each row once, written by rank 0 alone
    for a, b in zip(one, two):  # the step's metrics are over both ranks' rows
        assert b["student_tokens"] == a["student_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-9)
    evals = lambda run: [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]  # noqa: E731
    for a, b in zip(evals(single), evals(ranks)):  # each rank evaluated half of the 8 prompts; the outcomes were gathered
        assert (b["step"], b["rows"], b["graded"]) == (a["step"], a["rows"], a["graded"]) == (a["step"], 8, 8)
        assert b["mean_length"] == pytest.approx(a["mean_length"], abs=1.0)  # greedy, in other batches: padding may flip a token
    assert len(list((ranks / "tensorboard").glob("events.*"))) == 1
    assert json.loads((ranks / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("opd", ()), ("gkd", ()), ("gkd", ("train.gradient_checkpointing=true",))], ids=["opd", "gkd", "gkd-checkpointing"])
def test_fsdp_ranks_take_the_steps_of_one_unsharded_process(tmp_path, tiny_models, method, extra):
    """FSDP2 over 2 ranks (the student's weights, gradients and Adam state split in halves; the output layer gathered
    for GKD's fused full-vocabulary loss; each layer recomputed in the backward with gradient checkpointing) against
    1 unsharded process accumulating both halves of each step."""
    config = CONFIGS / ("demo.yaml" if method == "opd" else f"arithmetic/{method}.yaml")
    single, sharded = tmp_path / "one", tmp_path / "fsdp"
    ok(one_process(config, run_args(tiny_models, single, "train.steps=3", "train.grad_accum=2")))
    result = two_ranks(config, run_args(tiny_models, sharded, "train.steps=3", "train.sharding=fsdp", *extra))
    ok(result)
    assert "rank 0 holds" in result.stderr and "of the student's" in result.stderr
    held, total = map(int, re.search(r"rank 0 holds (\d+) of the student's (\d+) parameters", result.stderr).groups())
    assert held < 0.6 * total  # about half: layers and the root group each split over 2 ranks
    assert max_relative_difference(weights(sharded), weights(single)) <= 1e-5
    assert [r["loss"] for r in train_rows(sharded)] == pytest.approx([r["loss"] for r in train_rows(single)], rel=1e-5, abs=1e-9)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(sharded / "final")  # a plain transformers checkpoint
    assert type(final).__name__ == json.loads((sharded / "final" / "config.json").read_text())["architectures"][0] == "LlamaForCausalLM"
    assert set(weights(sharded)) == set(weights(single))  # the tied output layer written once, as unsharded


@pytest.mark.slow
def test_reopold_with_a_budget_that_leaves_a_rank_no_micro_batch_takes_one_process_steps(tmp_path, tiny_models):
    """A budget that holds the whole step: one rank trains nothing, yet joins REOPOLD's step-wide token selection
    (its collectives), and the 2 ranks give one process's weights."""
    config, budget = CONFIGS / "arithmetic/reopold.yaml", "train.micro_batch_tokens=100000"
    single, ranks = tmp_path / "one", tmp_path / "two"
    ok(one_process(config, run_args(tiny_models, single, "train.steps=2", "train.grad_accum=2", budget)))
    ok(two_ranks(config, run_args(tiny_models, ranks, "train.steps=2", budget)))
    assert [r["micro_batches"] for r in train_rows(single)] == [1, 1]
    assert max_relative_difference(weights(ranks), weights(single)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("sharding, extra", [("none", ()), ("fsdp", ()), ("none", LORA_DROPOUT)], ids=["ddp", "fsdp", "ddp-lora-dropout"])
def test_token_budget_micro_batches_over_two_ranks_take_the_steps_of_one_process(tmp_path, tiny_models, sharding, extra):
    """train.micro_batch_tokens over 2 ranks: the step's rows gathered, cut under the budget and dealt to the ranks by
    tokens (a sharded rank with fewer micro-batches runs empty passes; each pass's dropout seeded by its place in the
    step's plan, whichever rank runs it) give one process's weights and losses."""
    config, budget = CONFIGS / "arithmetic/gkd.yaml", "train.micro_batch_tokens=70"  # 3, 3 and 4 passes in its 3 steps
    single, ranks = tmp_path / "one", tmp_path / "two"
    ok(one_process(config, run_args(tiny_models, single, "train.steps=3", "train.grad_accum=2", budget, *extra)))
    ok(two_ranks(config, run_args(tiny_models, ranks, "train.steps=3", f"train.sharding={sharding}", budget, *extra)))
    assert max_relative_difference(weights(ranks), weights(single)) <= 1e-5
    one, two = train_rows(single), train_rows(ranks)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5, abs=1e-9)
    assert [r["micro_batches"] for r in two] == [r["micro_batches"] for r in one]
    assert all(r["micro_batches"] > 2 for r in one)  # the budget, not the 2 sampled micro-batches, made the passes
    assert any(r["micro_batches"] % 2 for r in one)  # an odd count: one rank ran an empty pass when sharded


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_weights_sharded_or_not(tmp_path, tiny_models):
    """kill -9 of one FSDP rank at a random step, then a 2-rank FSDP resume → the uninterrupted run's weights; and the
    same checkpoints resumed by one unsharded process (they hold whole tensors) → the same weights."""
    config, steps = CONFIGS / "demo.yaml", 8  # (12 steps took 146 s of the slow suite; 8 leave 3 past any kill)
    common = [f"train.steps={steps}", "checkpoint.every=1", "checkpoint.keep_last=2", "sampling.max_new_tokens=32", "train.sharding=fsdp"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(two_ranks(config, run_args(tiny_models, straight, *common)))

    kill_after = kill_rank_one_after(config, run_args(tiny_models, killed, *common), killed, random.Random().randint(2, 5))
    assert not (killed / "final").exists(), f"the run finished before the kill at step {kill_after}"
    unsharded = tmp_path / "unsharded"
    shutil.copytree(killed, unsharded)
    saved = (unsharded / "config.yaml").read_text()
    (unsharded / "config.yaml").write_text(saved.replace(str(killed), str(unsharded)))

    ok(two_ranks(config, run_args(tiny_models, killed, *common, "run.resume=true")))
    assert max_relative_difference(weights(killed), weights(straight)) <= 1e-5, f"killed after step {kill_after}"
    assert [r["loss"] for r in train_rows(killed)] == pytest.approx([r["loss"] for r in train_rows(straight)], rel=1e-6)

    alone = [a for a in common if a != "train.sharding=fsdp"]
    ok(one_process(config, run_args(tiny_models, unsharded, *alone, "train.grad_accum=2", "run.resume=true")))
    assert max_relative_difference(weights(unsharded), weights(straight)) <= 1e-5
    assert not (unsharded / "resume_changes.jsonl").exists()  # sharding is how the run is held, not what it computes


@pytest.mark.slow
def test_a_rank_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path, tiny_models):
    config, steps = CONFIGS / "demo.yaml", 8  # (24 steps took 8 minutes of the slow suite, 12 took 3.5; 8 leave 3 past any kill)
    common = [f"train.steps={steps}", "checkpoint.every=1", "checkpoint.keep_last=2", "sampling.max_new_tokens=32", *LORA_DROPOUT]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(two_ranks(config, run_args(tiny_models, straight, *common)))

    kill_after = kill_rank_one_after(config, run_args(tiny_models, killed, *common), killed, random.Random().randint(2, 5))  # the run goes on past it
    assert not (killed / "final").exists(), f"the run finished before the kill at step {kill_after}"

    ok(two_ranks(config, run_args(tiny_models, killed, *common, "run.resume=true")))
    assert max_relative_difference(weights(killed), weights(straight)) <= 1e-5, f"killed after step {kill_after}"
    resumed, uninterrupted = train_rows(killed), train_rows(straight)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in uninterrupted], rel=1e-6)


@pytest.mark.slow
def test_a_resume_may_split_the_step_otherwise_but_keeps_its_micro_batches(tmp_path, tiny_models):
    config, run = CONFIGS / "demo.yaml", tmp_path / "run"
    common = ["train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=3", *LORA_DROPOUT]
    ok(two_ranks(config, run_args(tiny_models, run, *common)))
    uninterrupted = weights(run)
    shutil.rmtree(run / "checkpoints" / "step-000003")  # as if stopped after step 2
    ok(one_process(config, run_args(tiny_models, run, *common, "train.grad_accum=2", "run.resume=true")))  # 1 process x 2 micro-batches
    assert max_relative_difference(weights(run), uninterrupted) <= 1e-5
    assert not (run / "resume_changes.jsonl").exists()  # not recorded as a change: it is the same run
    shutil.rmtree(run / "checkpoints" / "step-000003")
    result = one_process(config, run_args(tiny_models, run, *common, "train.grad_accum=1", "run.resume=true"))
    assert result.returncode == 2 and "train.grad_accum: 2 -> 1" in result.stderr  # fewer micro-batches: another run
