"""OPD with a task reward (methods/opd_task_reward.py): A = α · group-normalised reward + reverse-KL advantage."""

import json
import random

import pytest
import torch
from conftest import make_config

from opd.config.loading import load_config
from opd.config.sections import ConfigError
from opd.methods.base import student_samples
from opd.methods.losses import group_policy_loss
from opd.methods.opd import OPD
from opd.methods.opd_task_reward import task_reward_advantages
from opd.objectives import group_advantages
from opd.training.assembly import build_session
from opd.training.loop import train


def test_advantage_is_the_sum_of_the_two_formulas():
    torch.manual_seed(0)
    lp, tlp = -torch.rand(4, 3, dtype=torch.float64), -torch.rand(4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    rewards, groups = [1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1]
    task = group_advantages(torch.tensor(rewards), torch.tensor(groups))  # the sample std by default
    adv = task_reward_advantages(lp, tlp, mask, task, coef=0.5, task_reward_coef=2.0)
    for i in range(4):  # written out: group of 2 with rewards {1, 0}: mean 0.5, sample std 1/√2 (TRL's, the default)
        members = [rewards[j] for j in range(4) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        std = (sum((x - mean) ** 2 for x in members) / (len(members) - 1)) ** 0.5
        task = (rewards[i] - mean) / (std + 1e-6)
        for t in range(3):
            expected = (2.0 * task - 0.5 * (lp[i, t] - tlp[i, t])) * mask[i, t]
            assert abs(float(adv[i, t]) - float(expected)) < 1e-6


@pytest.fixture()
def session_and_batch(tmp_path, tiny_models):
    def make(*overrides):
        s = build_session(make_config(tmp_path, tiny_models, "method.name=opd_task_reward", "sampling.samples_per_prompt=4", *overrides))
        batch = student_samples(s, s.task.sample_train(4, random.Random(0)), torch.Generator().manual_seed(0))
        batch.rewards = [float(i % 3 == 0) for i in range(len(batch.rewards))]  # every group has a reward spread
        return s, batch

    return make


def gradients(s, loss):
    s.student.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in s.student.parameters() if p.grad is not None]


def test_without_the_reward_it_is_opd(session_and_batch):
    s, batch = session_and_batch("method.opd_task_reward.task_reward_coef=0.0")
    ours, _ = s.method.loss(s, batch, 0)
    opd, _ = OPD(s.cfg).loss(s, batch, 0)
    assert torch.equal(ours, opd)
    for a, b in zip(gradients(s, s.method.loss(s, batch, 0)[0]), gradients(s, OPD(s.cfg).loss(s, batch, 0)[0])):
        assert torch.equal(a, b)


def test_without_the_teacher_term_it_is_grpo(session_and_batch):
    s, batch = session_and_batch("method.opd_task_reward.coef=0.0")
    ours, metrics = s.method.loss(s, batch, 0)
    grpo, _ = group_policy_loss(s, batch)  # the method's advantages: the rewards' within each group
    torch.testing.assert_close(ours, grpo, rtol=1e-6, atol=1e-8)
    for a, b in zip(gradients(s, s.method.loss(s, batch, 0)[0]), gradients(s, group_policy_loss(s, batch)[0])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert metrics["task_advantage_abs"] > 0


def test_it_trains_through_the_loop(tmp_path, tiny_models):
    summary = train(make_config(tmp_path, tiny_models, "method.name=opd_task_reward"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert summary["nonfinite_skips"] == 0 and len(train_rows) == 2
    assert all("task_advantage_abs" in r and "kl" in r and "reward" in r for r in train_rows)


def test_it_needs_a_group_and_a_teacher():
    with pytest.raises(ConfigError, match="'sampling.samples_per_prompt' must be >= 2 for opd_task_reward's group baseline, got 1"):
        load_config(None, ["student.path=s", "teacher.path=t", "method.name=opd_task_reward", "sampling.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="'teacher.path' is required by method 'opd_task_reward'"):
        load_config(None, ["student.path=s", "method.name=opd_task_reward"])
    with pytest.raises(ConfigError, match="'method.opd_task_reward.task_reward_coef' must be >= 0, got -1.0"):
        load_config(None, ["student.path=s", "teacher.path=t", "method.name=opd_task_reward", "method.opd_task_reward.task_reward_coef=-1"])
