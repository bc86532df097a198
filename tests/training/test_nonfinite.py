"""No objective turns a masked or impossible token into NaN: a finite loss and gradient, or — where the value is truly
infinite — an infinite loss that the loop skips, counts and explains."""

import logging
import math

import pytest
import torch
from conftest import make_config

from opd.objectives import (
    F_DIVERGENCES,
    f_divergence_advantages,
    gkd_loss,
    gopd_advantages,
    policy_gradient_loss,
    reverse_kl_advantages,
)
from opd.objectives.common import discounted_cumsum, masked_mean
from opd.objectives.fused import OutputHead
from opd.training.loop import train

INF = float("inf")
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def surrogate(advantage_fn, teacher_BC):
    """Loss and student-log-prob gradient of the shared surrogate for the given teacher log-probs."""
    logp = torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]], requires_grad=True)
    adv = advantage_fn(logp.detach(), teacher_BC, MASK)
    loss, _ = policy_gradient_loss(logp, logp.detach(), adv, MASK)
    loss.backward()
    return loss.detach(), logp.grad


CLEAN = torch.tensor([[-0.7, -0.3, 0.0], [-1.5, 0.0, 0.0]])


@pytest.mark.parametrize("poison", [INF, -INF, float("nan")])
@pytest.mark.parametrize(
    "advantage_fn",
    [
        lambda lp, tlp, m: reverse_kl_advantages(lp, tlp, m),
        lambda lp, tlp, m: reverse_kl_advantages(lp, tlp, m, discount=1.0),
        lambda lp, tlp, m: gopd_advantages(lp, tlp, tlp - 0.1, m, 1.5, discount=0.5),
        lambda lp, tlp, m: f_divergence_advantages(lp, tlp, m, "jsd", True, 1.0, None)[0],
        lambda lp, tlp, m: f_divergence_advantages(lp, tlp, m, "forward_kl", False, 0.0, None)[0],
    ],
    ids=["opd", "opd_return", "gopd", "opd_plus_jsd_noclip", "opd_fkl_noclip"],
)
def test_non_finite_values_at_masked_positions_change_nothing(advantage_fn, poison):
    poisoned = CLEAN.clone()
    poisoned[MASK == 0] = poison
    clean_loss, clean_grad = surrogate(advantage_fn, CLEAN)
    loss, grad = surrogate(advantage_fn, poisoned)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(loss, clean_loss) and torch.equal(grad, clean_grad)


def test_masked_helpers_select_rather_than_multiply():
    values = torch.tensor([[1.0, INF], [float("nan"), 2.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(masked_mean(values, mask)) == 1.5
    assert torch.equal(discounted_cumsum(values, mask, 1.0), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "hellinger", "tv"])
def test_opd_plus_without_a_clip_takes_the_limit_where_the_teacher_gives_zero(divergence):
    """u = 0 (teacher log-prob -inf) on a *valid* token: the OPD+ advantage is the u → 0 limit of -f(u) + u f'(u)."""
    teacher = CLEAN.clone()
    teacher[0, 1] = -INF
    adv, _ = f_divergence_advantages(torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]]), teacher, MASK, divergence, True, 0.0, None)
    limits = {"forward_kl": 0.0, "jsd": 0.5 * math.log(0.5), "hellinger": -1.0, "tv": -0.5}  # from the OPD+ table at u = 0
    assert torch.isfinite(adv).all()
    assert abs(float(adv[0, 1]) - limits[divergence]) < 1e-6
    f, _ = F_DIVERGENCES[divergence]
    assert torch.isfinite(f(torch.tensor([-INF])))


def test_a_reverse_kl_at_an_impossible_token_is_infinite_not_nan():
    teacher = CLEAN.clone()
    teacher[0, 1] = -INF
    for fn in (lambda lp, tlp, m: reverse_kl_advantages(lp, tlp, m), lambda lp, tlp, m: gopd_advantages(lp, tlp, CLEAN, m, 1.25)):
        logp = torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]], requires_grad=True)
        loss, _ = policy_gradient_loss(logp, logp.detach(), fn(logp.detach(), teacher, MASK), MASK)
        assert loss == INF


def gkd_inputs(teacher_zero_on_student_mass: bool):
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    head = torch.nn.Linear(4, 5, bias=False)
    teacher_hidden = torch.randn(2, 3, 4)

    def teacher_project(h):
        logits = h @ torch.ones(4, 5)
        if teacher_zero_on_student_mass:
            logits = logits.clone()
            logits[..., 0] = -INF  # the teacher gives token 0 no mass; the student gives it some
        return logits

    return hidden, head, teacher_hidden, teacher_project


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "streamed"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gkd_is_finite_where_the_teacher_has_zero_mass(fused, beta):
    hidden, head, teacher_hidden, teacher_project = gkd_inputs(True)
    student_head = OutputHead(head.weight) if fused else (lambda h: head(h))
    result = gkd_loss(hidden, teacher_hidden, student_head, teacher_project, torch.ones(2, 3), beta=beta, temperature=1.0)
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "streamed"])
def test_gkd_reverse_kl_where_the_teacher_has_zero_mass_is_infinite_not_nan(fused):
    hidden, head, teacher_hidden, teacher_project = gkd_inputs(True)
    student_head = OutputHead(head.weight) if fused else (lambda h: head(h))
    result = gkd_loss(hidden, teacher_hidden, student_head, teacher_project, torch.ones(2, 3), beta=1.0, temperature=1.0)
    assert result.loss == INF


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "streamed"])
def test_gkd_with_every_token_masked_backpropagates_zero(fused):
    hidden, head, teacher_hidden, teacher_project = gkd_inputs(False)
    student_head = OutputHead(head.weight) if fused else (lambda h: head(h))
    result = gkd_loss(hidden, teacher_hidden, student_head, teacher_project, torch.zeros(2, 3))
    result.loss.backward()
    assert float(result.loss.detach()) == 0.0 and hidden.grad is not None and not hidden.grad.any()


def test_the_loop_skips_counts_and_explains_an_impossible_teacher_token(tmp_path, tiny_models, monkeypatch, caplog):
    from opd.teachers.model import ModelTeacher

    real = ModelTeacher.token_logprobs

    def impossible_first_token(self, rollouts, temperature=1.0):
        logp = real(self, rollouts, temperature).clone()
        logp[0, 0] = -INF
        return logp

    monkeypatch.setattr(ModelTeacher, "token_logprobs", impossible_first_token)
    with caplog.at_level(logging.WARNING, logger="opd.training.loop"):
        summary = train(make_config(tmp_path, tiny_models, "train.steps=2"))
    assert summary["nonfinite_skips"] == 2
    assert "the teacher gave probability 0 to 1 sampled tokens" in caplog.text
    # the same teacher under OPD+ with its log-ratio clip trains normally
    summary = train(make_config(tmp_path / "plus", tiny_models, "train.steps=2", "method.name=opd_plus", "method.opd_plus.divergence=reverse_kl"))
    assert summary["nonfinite_skips"] == 0
