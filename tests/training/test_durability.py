"""Nothing lost: a damaged newest checkpoint falls back to the previous intact one (and the resumed run is bit-exact
with an uninterrupted one), a torn last metrics line is dropped, leftovers of interrupted writes are cleaned, and
final/ is never missing."""

import json
import logging

import pytest
import torch
from conftest import final_weights, killed_at_step, make_config, train_rows

from opd.training.checkpoints import MANIFEST, checkpoint_problem, list_checkpoints
from opd.training.final_model import recover_final_model
from opd.training.loop import train

COMMON = ["train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=3", "train.schedule=cosine"]


def interrupted_run(tmp_path, tiny_models, monkeypatch, stop_at=3):
    killed_at_step(monkeypatch, stop_at, lambda: train(make_config(tmp_path, tiny_models, *COMMON)))
    return tmp_path / "run" / "checkpoints"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda ckpt: truncate(ckpt / "trainable.safetensors"),
        lambda ckpt: (ckpt / "state.json").write_text(""),
        lambda ckpt: (ckpt / MANIFEST).unlink(),  # killed before the write finished
    ],
    ids=["truncated_weights", "empty_state", "no_manifest"],
)
def test_a_damaged_newest_checkpoint_falls_back_and_stays_bit_exact(tmp_path, tiny_models, monkeypatch, caplog, damage):
    train(make_config(tmp_path / "whole", tiny_models, *COMMON))
    checkpoints = interrupted_run(tmp_path / "cut", tiny_models, monkeypatch)
    newest = list_checkpoints(tmp_path / "cut" / "run")[-1]
    assert newest.name == "step-000003" and checkpoint_problem(newest) is None
    damage(newest)
    assert checkpoint_problem(newest) is not None
    with open(tmp_path / "cut" / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 4, "lo')  # and a torn last metrics line
    (checkpoints / ".tmp-step-000004-999").mkdir()  # leftovers of an interrupted write and deletion
    (checkpoints / ".deleting-step-000001").mkdir()
    with caplog.at_level(logging.WARNING, logger="opd.training.checkpoints"):
        train(make_config(tmp_path / "cut", tiny_models, *COMMON, "run.resume=true"))
    assert "checkpoint" in caplog.text and "step-000003 is damaged" in caplog.text
    a, b = final_weights(tmp_path / "whole" / "run"), final_weights(tmp_path / "cut" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_rows(tmp_path / "whole" / "run") == train_rows(tmp_path / "cut" / "run")
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]


def test_final_is_put_back_after_a_kill_between_the_two_renames(tmp_path):
    final, tmp, old = tmp_path / "final", tmp_path / "final.tmp", tmp_path / "final.old"
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new")
    (tmp / MANIFEST).write_text("{}")
    old.mkdir()
    (old / "model.safetensors").write_text("old")
    recover_final_model(final)  # killed after moving the old one aside: the complete new one goes in
    assert (final / "model.safetensors").read_text() == "new" and not tmp.exists() and not old.exists()
    final.rename(old)  # killed while writing the next one (no manifest yet), its predecessor set aside: it goes back
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("half")
    recover_final_model(final)
    assert (final / "model.safetensors").read_text() == "new" and not tmp.exists() and not old.exists()


def test_a_torn_line_anywhere_but_last_is_an_error(tmp_path):
    from opd.training.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tr\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON row"):
        read_metrics(path)
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tr')
    assert read_metrics(path) == [{"kind": "train", "step": 1}]
    assert json.loads(json.dumps(read_metrics(path)))


def test_resume_without_an_intact_checkpoint_refuses_instead_of_truncating(tmp_path, tiny_models):
    from opd.training.resume import RunDirError

    train(make_config(tmp_path, tiny_models, "train.steps=2"))  # checkpoint.every=0: no checkpoint
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"holds no intact checkpoint to resume from: this config saves none \(checkpoint\.every=0, checkpoint\.at_end=false\)"):
        train(make_config(tmp_path, tiny_models, "train.steps=2", "run.resume=true"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    # with checkpoints on (every 50 steps, as by default) the run simply stopped before its first one: say that
    with pytest.raises(RunDirError, match=r"no intact checkpoint to resume from: the run stopped before its first checkpoint \(checkpoint\.every=50, and at its end\); pass run\.overwrite=true"):
        train(make_config(tmp_path, tiny_models, "train.steps=2", "run.resume=true", "checkpoint.every=50", "checkpoint.at_end=true"))


def test_final_is_swapped_in_atomically(tmp_path):
    from opd.training.final_model import exchange

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model").write_text("old")
    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "final.tmp" / "model").write_text("new")
    assert exchange(tmp_path / "final.tmp", tmp_path / "final")  # Linux: one renameat2 call, final/ never absent
    assert (tmp_path / "final" / "model").read_text() == "new" and (tmp_path / "final.tmp" / "model").read_text() == "old"
