"""Resume continues the same run or says why not: trajectory-changing settings are refused (or, when allowed, take
effect and are recorded), a checkpoint past train.steps is refused, and no metrics row is duplicated."""

import json
import shutil

import pytest
from conftest import make_config

from opd.training.loop import train
from opd.training.resume import RunDirError

FIRST = ["train.steps=4", "checkpoint.every=2", "train.schedule=constant"]


def rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "change, named",
    [
        ("train.lr=1e-2", "train.lr: 0.001 -> 0.01"),
        ("method.name=sft", "method.name: 'opd' -> 'sft'"),
        ("run.seed=7", "run.seed: 0 -> 7"),
        ("student.lora.enabled=true", "student.lora.enabled: False -> True"),  # a full-weight checkpoint under LoRA
    ],
)
def test_a_changed_trajectory_setting_is_refused_naming_the_key(tmp_path, tiny_models, change, named):
    train(make_config(tmp_path, tiny_models, *FIRST))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=f"settings that alter the run: {named}.*run.allow_changes=true"):
        train(make_config(tmp_path, tiny_models, *FIRST, "run.resume=true", change))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_an_allowed_change_takes_effect_and_is_recorded(tmp_path, tiny_models):
    train(make_config(tmp_path, tiny_models, "train.steps=2", "checkpoint.every=2", "train.schedule=constant"))
    train(make_config(tmp_path, tiny_models, "train.steps=4", "checkpoint.every=2", "train.schedule=constant",
                      "run.resume=true", "run.allow_changes=true", "train.lr=5e-4", "eval.every=1"))
    lrs = [r["lr"] for r in rows(tmp_path) if r["kind"] == "train"]
    assert lrs == [1e-3, 1e-3, 5e-4, 5e-4]  # the new rate is used, not the checkpoint's
    (recorded,) = [json.loads(line) for line in (tmp_path / "run" / "resume_changes.jsonl").read_text().splitlines()]
    assert recorded == {"resumed_at_step": 2, "changes": {"train.lr": {"from": 0.001, "to": 0.0005}, "train.steps": {"from": 2, "to": 4}}}


def test_a_resume_that_fails_before_it_starts_records_no_change(tmp_path, tiny_models):
    """An allowed change, but the resumed run cannot start (its data file is missing): resume_changes.jsonl stays absent,
    so the run's record does not claim a resume that never happened."""
    from opd.tasks import DataError

    train(make_config(tmp_path, tiny_models, "train.steps=2", "checkpoint.every=2"))
    with pytest.raises(DataError, match="no such file"):
        train(make_config(tmp_path, tiny_models, "train.steps=4", "checkpoint.every=2", "run.resume=true", "run.allow_changes=true",
                          "task.name=math", f"task.path={tmp_path / 'missing.jsonl'}"))
    assert not (tmp_path / "run" / "resume_changes.jsonl").exists()


def test_a_checkpoint_past_the_configured_steps_is_refused(tmp_path, tiny_models):
    train(make_config(tmp_path, tiny_models, *FIRST))
    with pytest.raises(RunDirError, match="the newest checkpoint is at step 4, past train.steps=2"):
        train(make_config(tmp_path, tiny_models, "train.steps=2", "checkpoint.every=2", "run.resume=true", "run.allow_changes=true"))


def test_resuming_a_finished_run_does_not_duplicate_its_final_evaluation(tmp_path, tiny_models):
    train(make_config(tmp_path, tiny_models, *FIRST))
    first = rows(tmp_path)
    train(make_config(tmp_path, tiny_models, *FIRST, "run.resume=true"))
    again = rows(tmp_path)
    key = lambda r: (r["kind"], r["step"])  # noqa: E731
    assert [key(r) for r in again] == [key(r) for r in first]
    assert [r for r in again if r["kind"] == "eval"][-1]["accuracy"] == [r for r in first if r["kind"] == "eval"][-1]["accuracy"]


def as_saved_before_the_renames(run_dir):
    """The run's config.yaml as opd wrote it before method.ovd.http's keys were renamed and method.ovd.baseline existed."""
    import yaml

    path = run_dir / "config.yaml"
    tree = yaml.safe_load(path.read_text())
    http = tree["method"]["ovd"]["http"]
    http["timeout"], http["max_reply_bytes"] = http.pop("deadline"), int(http.pop("max_reply_mb") * (1 << 20))
    del tree["method"]["ovd"]["baseline"]
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")  # as if stopped after step 2


def test_a_run_saved_before_keys_were_renamed_or_added_resumes_as_the_run_it_was(tmp_path, tiny_models):
    """An OPD run's saved config holds every method's section: the old spellings there are read as the new ones, and
    neither they nor the other methods' keys are changes of an OPD run."""
    from opd.config.loading import load_saved_config

    train(make_config(tmp_path, tiny_models, *FIRST))
    as_saved_before_the_renames(tmp_path / "run")
    saved = load_saved_config(tmp_path / "run" / "config.yaml")
    assert saved.method.ovd.http.deadline == 30.0 and saved.method.ovd.http.max_reply_mb == 1.0
    assert saved.method.ovd.baseline == "final_group"  # what OVD did before the key existed
    train(make_config(tmp_path, tiny_models, *FIRST, "run.resume=true", "method.gkd.beta=0.9"))
    assert [r["step"] for r in rows(tmp_path) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_an_ovd_run_saved_before_the_baseline_existed_is_not_resumed_with_another(tmp_path, tiny_models):
    ovd = ["method.name=ovd", "method.ovd.threshold=5"]
    train(make_config(tmp_path, tiny_models, *FIRST, *ovd))
    as_saved_before_the_renames(tmp_path / "run")
    with pytest.raises(RunDirError, match="method.ovd.baseline: 'final_group' -> 'student'"):
        train(make_config(tmp_path, tiny_models, *FIRST, *ovd, "run.resume=true"))
    train(make_config(tmp_path, tiny_models, *FIRST, *ovd, "run.resume=true", "method.ovd.baseline=final_group"))
    assert [r["step"] for r in rows(tmp_path) if r["kind"] == "train"] == [1, 2, 3, 4]
