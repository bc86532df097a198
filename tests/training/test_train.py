"""The training loop end to end on tiny models: resume, non-finite steps, checkpoints, LoRA, logs."""

import json

import pytest
import torch
from conftest import final_weights, killed_at_step, make_config, train_rows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.tasks import DataError
from opd.training.errors import TrainingError
from opd.training.loop import train
from opd.training.resume import RunDirError


@pytest.mark.parametrize("method", ["opd", "gkd"])
def test_resumed_run_matches_uninterrupted_run(tmp_path, tiny_models, monkeypatch, method):
    common = ["train.steps=4", "checkpoint.every=2", f"method.name={method}", "method.gkd.lambda_onpolicy=0.5", "train.schedule=cosine", "train.warmup_steps=1"]
    whole = make_config(tmp_path / "a", tiny_models, *common)
    train(whole)

    interrupted = make_config(tmp_path / "b", tiny_models, *common)
    killed_at_step(monkeypatch, 2, lambda: train(interrupted))  # the third step: after the checkpoint at step 2
    resumed = make_config(tmp_path / "b", tiny_models, *common, "run.resume=true")
    summary = train(resumed)

    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert train_rows(tmp_path / "a" / "run") == train_rows(tmp_path / "b" / "run")
    assert summary["student_accuracy_before"] is not None  # carried over from the first segment
    initial = load_file(str(tiny_models[1] / "model.safetensors"))
    assert any(not torch.equal(a[n], initial[n]) for n in initial)  # training changed the weights


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, tiny_models, monkeypatch):
    from opd.teachers.model import ModelTeacher

    real = ModelTeacher.token_logprobs
    calls = {"n": 0}

    def nan_on_first_call(self, rollouts, temperature=1.0):
        calls["n"] += 1
        out = real(self, rollouts, temperature)
        return out * float("nan") if calls["n"] == 1 else out

    monkeypatch.setattr(ModelTeacher, "token_logprobs", nan_on_first_call)
    cfg = make_config(tmp_path, tiny_models, "train.steps=3")
    summary = train(cfg)
    assert summary["nonfinite_skips"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows if r["kind"] == "train"] == [1.0, 0.0, 0.0]


def test_persistent_nonfinite_stops_with_a_message(tmp_path, tiny_models, monkeypatch):
    from opd.teachers.model import ModelTeacher

    monkeypatch.setattr(ModelTeacher, "token_logprobs", lambda self, r, temperature=1.0: torch.full(r.completion_ids_BC.shape, float("nan")))
    cfg = make_config(tmp_path, tiny_models, "train.steps=10", "train.max_consecutive_nonfinite=3")
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss or gradient \\(last at step 3\\)"):
        train(cfg)

    def strict(text):  # NaN / Infinity are not JSON
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds {name}"))

    rows = [strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]  # the step that stopped the run has its row
    assert all(r["loss"] is None and "loss" in r["nonfinite"] for r in train_rows)


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_models):
    train(make_config(tmp_path, tiny_models, "train.steps=1", "method.name=sft"))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="already holds a run; pass run.resume=true .* or run.overwrite=true"):
        train(make_config(tmp_path, tiny_models, "train.steps=1", "method.name=sft"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_run_outputs_load_back_and_logs_exist(tmp_path, tiny_models):
    cfg = make_config(
        tmp_path, tiny_models, "train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=1",
        "log.tensorboard=true", "log.plot=true", "eval.every=1", "eval.k=2", "eval.teacher=true",
    )
    summary = train(cfg)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # keep_last=1
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.vocab_size == len(tok)
    assert (run / "curves.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    saved = (run / "config.yaml").read_text()
    assert "steps: 2" in saved
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "steps", "wall_seconds"):
        assert summary[key] is not None
    assert set(summary["eval_after"]) == {"accuracy", "mean_length", "avg@2", "pass@2", "rows", "graded"}
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [0, 1, 2]
    # where the step time went: every phase of an OPD step is timed, and the shares add up to 1
    assert set(summary["phase_seconds"]) == {"sample", "sync", "teacher", "student", "optimizer"}
    assert abs(sum(summary["phase_shares"].values()) - 1) < 1e-3
    train_row = next(r for r in evals if r["kind"] == "train")
    assert train_row["time/sample"] > 0 and train_row["time/teacher"] > 0
    assert sum(v for k, v in train_row.items() if k.startswith("time/")) <= train_row["step_seconds"]


def test_lora_run_saves_merged_model(tmp_path, tiny_models):
    cfg = make_config(tmp_path, tiny_models, "student.lora.enabled=true", "student.lora.r=4", "train.lr=1e-2", "checkpoint.every=2")
    train(cfg)
    run = tmp_path / "run"
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_models[1])
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # LoRA touched the linear layers only
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()
    trainable = load_file(str(run / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert trainable and all("lora_" in k for k in trainable)


def test_opd_reduces_teacher_student_kl(tmp_path, tiny_models):
    """Behaviour: on-policy reverse-KL training moves the student towards the teacher."""
    cfg = make_config(tmp_path, tiny_models, "train.steps=25", "train.lr=3e-3", "train.prompts_per_step=8", "sampling.samples_per_prompt=4")
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rows if r["kind"] == "train"]
    first, last = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_sft_on_teacher_samples_runs(tmp_path, tiny_models):
    summary = train(make_config(tmp_path, tiny_models, "method.name=sft", "method.sft.source=teacher"))
    assert summary["nonfinite_skips"] == 0 and summary["generated_tokens"] == 0


def _math_jsonl(path, n=12):
    import json as _json

    rows = [{"problem": f"{i}+{i}?", "solution": f"{i}+{i}={2 * i}, so \\boxed{{{2 * i}}}", "answer": str(2 * i)} for i in range(n)]
    path.write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    return path


def test_math_task_trains_from_jsonl(tmp_path, tiny_models):
    data = _math_jsonl(tmp_path / "math.jsonl")
    cfg = make_config(tmp_path, tiny_models, "task.name=math", f"task.path={data}", "task.eval_size=4", "method.name=sft", "train.steps=2")
    summary = train(cfg)
    assert summary["task"] == "math" and summary["eval_after"]["accuracy"] >= 0


def test_prompt_longer_than_context_is_named(tmp_path, tiny_models):

    data = _math_jsonl(tmp_path / "math.jsonl")
    cfg = make_config(tmp_path, tiny_models, "task.name=math", f"task.path={data}", "method.name=opd", "sampling.max_new_tokens=60",
                      "task.too_long=error")
    # the pre-flight pass meets the long rows before any model is loaded
    with pytest.raises(DataError, match=r"math.jsonl:\d+: prompt of \d+ tokens is longer than the 68 the context leaves for it \(task.too_long=skip or truncate"):
        train(cfg)


def test_bf16_autocast_step_is_finite(tmp_path, tiny_models):
    summary = train(make_config(tmp_path, tiny_models, "train.precision=bf16", "train.steps=1"))
    assert summary["nonfinite_skips"] == 0


def test_zero_gradient_step_does_not_move_the_weights(tmp_path, tiny_models, monkeypatch):
    """A batch with no signal (all advantages zero) must not step Adam, which would drift on stale momentum."""
    from opd.methods.opd import OPD

    real_loss = OPD.loss

    def loss_zero_after_first_step(self, s, batch, step):
        loss, metrics = real_loss(self, s, batch, step)
        return (loss if step == 0 else 0.0 * loss), metrics

    monkeypatch.setattr(OPD, "loss", loss_zero_after_first_step)
    one = train(make_config(tmp_path / "one", tiny_models, "train.steps=1"))
    three = train(make_config(tmp_path / "three", tiny_models, "train.steps=3"))
    a, b = final_weights(tmp_path / "one" / "run"), final_weights(tmp_path / "three" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (one["no_signal_steps"], three["no_signal_steps"], three["nonfinite_skips"]) == (0, 2, 0)
