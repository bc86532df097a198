"""Several optimizer updates per batch of rollouts: the ratio is taken against the policy that made the batch, so
the PPO clip binds; with one update per batch the clip is inert and refused. GRPO's std is TRL's (sample std)."""

import json

import pytest
import torch
from conftest import make_config

from opd.config.loading import load_config
from opd.config.sections import ConfigError
from opd.objectives import group_advantages
from opd.training.loop import train


def train_rows(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_the_clip_binds_from_the_second_update(tmp_path, tiny_models):
    train(make_config(tmp_path, tiny_models, "method.name=opd", "train.updates_per_batch=3", "method.clip_eps=0.05",
                      "train.lr=3e-2", "train.grad_clip=null"))
    rows = train_rows(tmp_path / "run")
    assert all(r["clip_fraction"] == 0.0 for r in rows)  # the first update: ratio exactly 1
    assert any(r["clip_fraction_last"] > 0.0 for r in rows)  # later updates move the ratio past 1 ± ε


def test_more_updates_move_the_student_further(tmp_path, tiny_models):
    from safetensors.torch import load_file

    def final(name, updates):
        train(make_config(tmp_path / name, tiny_models, "train.steps=1", f"train.updates_per_batch={updates}"))
        return load_file(str(tmp_path / name / "run" / "final" / "model.safetensors"))

    initial = load_file(str(tiny_models[1] / "model.safetensors"))
    one, three = final("one", 1), final("three", 3)
    moved = lambda w: sum(float((w[k] - initial[k]).abs().sum()) for k in initial)  # noqa: E731
    assert moved(three) > 1.5 * moved(one) > 0


def test_an_inert_clip_is_refused():
    with pytest.raises(ConfigError, match="'method.clip_eps' has no effect with train.updates_per_batch=1"):
        load_config(None, ["student.path=s", "method.name=grpo", "method.clip_eps=0.2"])
    assert load_config(None, ["student.path=s", "method.name=grpo", "method.clip_eps=0.2", "train.updates_per_batch=2"])


def test_group_std_is_the_sample_std_like_trl():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(rewards, groups)
    first = rewards[:4]
    trl = (first - first.mean()) / (first.std() + 1e-6)  # torch.std: Bessel-corrected, what TRL's GRPOTrainer uses
    torch.testing.assert_close(adv[:4], trl)
    assert torch.equal(adv[4:], torch.zeros(2))  # equal rewards: no signal
    population = group_advantages(rewards, groups, unbiased=False)
    torch.testing.assert_close(population[:4], (first - 0.5) / (0.5 + 1e-6))
    assert float(group_advantages(torch.tensor([1.0]), torch.tensor([0]))) == 0.0  # a group of one


def test_a_step_chooses_its_tokens_once_however_many_updates(tmp_path, tiny_models, monkeypatch):
    from opd.methods.reopold import Reopold

    calls = []
    real = Reopold.prepare_step
    monkeypatch.setattr(Reopold, "prepare_step", lambda self, s, batches, step: calls.append(step) or real(self, s, batches, step))
    train(make_config(tmp_path, tiny_models, "method.name=reopold", "train.updates_per_batch=3", "train.steps=2"))
    assert calls == [0, 1]
