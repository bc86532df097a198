"""The normaliser is the whole step's: accumulating micro-batches gives the gradient of the one big batch; and with the
constant normaliser the sampled-token estimators are unbiased for variable-length completions (exact enumeration)."""

import itertools
import random

import pytest
import torch
from conftest import make_config

from opd.methods.batch import Batch
from opd.objectives import f_divergence_advantages, policy_gradient_loss, step_normaliser
from opd.objectives.opd_plus import F_DIVERGENCES
from opd.training.assembly import build_session
from opd.training.loop import SUMMED_METRICS, accumulate_gradients

# the embedded world's student stops at EOS, so completions (and micro-batches) differ in length
WORLD = ["student.path=world:student", "teacher.path=world:teacher", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=40"]


def split(batch: Batch, parts: int) -> list[Batch]:
    rows = batch.rollouts.batch_size // parts
    out = []
    for i in range(parts):
        index = list(range(i * rows, (i + 1) * rows))
        out.append(Batch(batch.rollouts.select(index), [batch.examples[j] for j in index], batch.on_policy,
                         [batch.rewards[j] for j in index] if batch.rewards else None, dict(batch.info)))
    return out


def step_gradients(s, batches, step=0):
    s.student.zero_grad(set_to_none=True)
    sums, counts, finite = accumulate_gradients(s, batches, step)
    metrics = s.ranks.merge_metrics(sums, counts, SUMMED_METRICS)
    assert finite
    return [p.grad.clone() for p in s.student.parameters() if p.grad is not None], metrics


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=opd"],
        ["method.name=opd", "method.reduction=seq_mean_token_mean"],
        ["method.name=opd_plus"],  # constant normaliser (its default)
        ["method.name=gkd", "method.gkd.lambda_onpolicy=1.0"],
        ["method.name=grpo"],
        ["method.name=reopold", "method.reopold.switch_step=0"],  # entropy selection over the whole step
        ["method.name=reopold", "method.reopold.switch_step=5"],  # exploration mask
        ["method.name=sft"],
    ],
    ids=["opd", "opd_seq_mean", "opd_plus_constant", "gkd", "grpo", "reopold_entropy", "reopold_explore", "sft"],
)
def test_grad_accum_gives_the_gradient_of_the_whole_step(tmp_path, tiny_models, overrides):
    s = build_session(make_config(tmp_path, tiny_models, *WORLD, *overrides))
    examples = s.task.sample_train(4, random.Random(0))
    whole = s.method.data(s, examples, random.Random(1), torch.Generator().manual_seed(0))
    per_part = whole.trained_mask_BC.sum(-1).reshape(4, -1).sum(-1).tolist()
    assert len(set(per_part)) > 1, "micro-batches with different token counts make the test meaningful"
    one, one_metrics = step_gradients(s, [whole])
    four, four_metrics = step_gradients(s, split(whole, 4))
    assert len(one) == len(four) > 0
    for a, b in zip(one, four):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-7)
    assert abs(one_metrics["loss"] - four_metrics["loss"]) < 1e-5 * max(1.0, abs(one_metrics["loss"]))


def test_micro_batch_normalisation_would_differ(tmp_path, tiny_models):
    """The control: normalising each micro-batch by its own count (the old behaviour) changes the gradient here."""
    s = build_session(make_config(tmp_path, tiny_models, *WORLD))
    whole = s.method.data(s, s.task.sample_train(4, random.Random(0)), random.Random(1), torch.Generator().manual_seed(0))
    one, _ = step_gradients(s, [whole])
    s.student.zero_grad(set_to_none=True)
    for part in split(whole, 4):  # each normalised alone, averaged
        loss, _ = s.method.loss(s, part, 0)
        (loss / 4).backward()
    local = [p.grad.clone() for p in s.student.parameters() if p.grad is not None]
    assert max(float((a - b).abs().max()) for a, b in zip(one, local)) > 1e-4


# ----------------------------------------------------------------------------- exact enumeration, variable lengths

VOCAB, MAX_LEN, EOS = 3, 3, 0  # token 0 ends a completion


def completions():
    """Every completion of at most MAX_LEN tokens that ends at EOS or at the length limit."""
    out = []
    for length in range(1, MAX_LEN + 1):
        for seq in itertools.product(range(VOCAB), repeat=length):
            if all(t != EOS for t in seq[:-1]) and (seq[-1] == EOS or length == MAX_LEN):
                out.append(seq)
    return out


def per_token_logp(table: torch.Tensor, seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S, MAX_LEN]`` log-probs of each completion's tokens under a tabular model (state = position, previous
    token), and its mask."""
    logp_table = table.log_softmax(-1)
    logp = torch.zeros(len(seqs), MAX_LEN, dtype=table.dtype)
    mask = torch.zeros(len(seqs), MAX_LEN, dtype=table.dtype)
    rows = []
    for i, seq in enumerate(seqs):
        row = [logp_table[t * VOCAB + (seq[t - 1] if t else 0), tok] for t, tok in enumerate(seq)]
        rows.append(torch.stack(row + [table.new_zeros(())] * (MAX_LEN - len(seq))))
        mask[i, : len(seq)] = 1
    return torch.stack(rows), mask


def expected_gradient(divergence, reduction, teacher_is_student, batch_size, seed=0):
    """(E[∇ surrogate], ∇ E[Σ_t f(u_t)]) for one step of ``batch_size`` i.i.d. completions, summed exactly."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(MAX_LEN * VOCAB, VOCAB, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = theta.detach().clone() if teacher_is_student else torch.randn(MAX_LEN * VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    seqs = completions()
    student_logp, mask = per_token_logp(theta, seqs)
    teacher_logp, _ = per_token_logp(teacher, seqs)
    prob = (student_logp * mask).sum(-1).exp()
    assert abs(float(prob.detach().sum()) - 1) < 1e-12
    # the objective, independently: E_y[Σ_t f(u_t)] with f from the OPD+ table, summed over every completion
    f, _ = F_DIVERGENCES[divergence]
    objective = (prob * (f(teacher_logp - student_logp) * mask).sum(-1)).sum()
    (true_grad,) = torch.autograd.grad(objective, theta, retain_graph=True)
    estimate = torch.zeros_like(theta)
    for combo in itertools.product(range(len(seqs)), repeat=batch_size):
        idx = list(combo)
        lp, tlp, m = student_logp[idx], teacher_logp[idx], mask[idx]
        adv, _ = f_divergence_advantages(lp.detach(), tlp, m, divergence, True, 1.0, None)
        normaliser = step_normaliser([m], reduction, MAX_LEN)
        loss, _ = policy_gradient_loss(lp, lp.detach(), adv, m, None, normaliser)
        (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
        estimate += float(prob[idx].prod().detach()) * g
    if reduction == "constant":
        estimate = estimate * batch_size * MAX_LEN  # the constant the surrogate is divided by
    return estimate, true_grad


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_teacher_equals_student_gives_zero_expected_gradient_with_the_constant_normaliser(divergence, batch_size):
    """OPD+ reverse / forward KL at teacher = student: a constant advantage ∓1, whose expected gradient is zero under
    a constant normaliser and ∓∇E[1/N] (length drift) under the token mean."""
    constant, _ = expected_gradient(divergence, "constant", True, batch_size)
    assert float(constant.abs().max()) < 1e-12
    token_mean, _ = expected_gradient(divergence, "token_mean", True, batch_size)
    assert float(token_mean.abs().max()) > 1e-3


@pytest.mark.parametrize("divergence", list(F_DIVERGENCES))
def test_opd_plus_full_return_is_unbiased_with_the_constant_normaliser_for_variable_lengths(divergence):
    """Claim (docs/methods.md): sequence-form OPD+ (γ = 1), constant normaliser, temperature 1 — E[∇ surrogate]
    times the constant equals ∇E[Σ_t f(u_t)] exactly; the token mean does not."""
    estimate, true_grad = expected_gradient(divergence, "constant", False, 1)
    assert float((estimate - true_grad).norm() / true_grad.norm()) < 1e-12
    biased, _ = expected_gradient(divergence, "token_mean", False, 1)
    assert float((biased * MAX_LEN - true_grad).norm() / true_grad.norm()) > 0.05


# ----------------------------------------------------------------------------- temperature


def test_the_student_log_probs_are_those_of_the_policy_that_sampled(tmp_path, tiny_models):
    """At sampling temperature 1.3 the estimators' ℓ^S equals the sampler's own log-prob of each sampled token (no
    truncation), and the teacher scores at its own temperature (teacher.temperature)."""
    from opd.methods.losses import sampled_token_loss
    from opd.teachers.model import ModelTeacher

    s = build_session(make_config(tmp_path, tiny_models, "sampling.temperature=1.3", "teacher.temperature=0.7"))
    batch = s.method.data(s, s.task.sample_train(2, random.Random(0)), random.Random(0), torch.Generator().manual_seed(0))
    seen = {}

    def advantages(lp, tlp, mask):
        seen.update(student=lp, teacher=tlp)
        return tlp - lp, mask, {}

    sampled_token_loss(s, batch, advantages)
    r, valid = batch.rollouts, batch.rollouts.loss_mask_BC.bool()
    torch.testing.assert_close(seen["student"][valid], r.sampler_logp_BC[valid], rtol=1e-5, atol=1e-5)
    assert isinstance(s.teacher, ModelTeacher)
    torch.testing.assert_close(seen["teacher"], s.teacher.token_logprobs(r, 0.7))
    assert s.method.importance_cap() is None


def test_truncated_sampling_turns_the_importance_correction_on(tmp_path, tiny_models):
    s = build_session(make_config(tmp_path, tiny_models, "sampling.top_p=0.9"))
    assert s.method.importance_cap() == 5.0
    s = build_session(make_config(tmp_path / "b", tiny_models, "sampling.top_k=5", "method.is_correction_cap=2"))
    assert s.method.importance_cap() == 2.0


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_sampled_token_estimators_are_unbiased_for_the_tempered_policy(divergence):
    """Claim: sampling at τ, sequence-form OPD+ (γ = 1) with the constant normaliser and ℓ^S = log softmax(θ/τ) has
    E[∇ surrogate] ∝ ∇ E_{π_τ}[Σ_t f(π_T/π_τ)] exactly; with ℓ^S at τ = 1 (the policy that did not sample) it does not."""
    tau = 1.7
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(MAX_LEN * VOCAB, VOCAB, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(MAX_LEN * VOCAB, VOCAB, generator=gen, dtype=torch.float64)
    seqs = completions()
    tempered_logp, mask = per_token_logp(theta / tau, seqs)  # the policy that samples
    untempered_logp, _ = per_token_logp(theta, seqs)
    teacher_logp, _ = per_token_logp(teacher, seqs)
    prob = (tempered_logp * mask).sum(-1).exp()
    f, _ = F_DIVERGENCES[divergence]
    objective = (prob * (f(teacher_logp - tempered_logp) * mask).sum(-1)).sum()
    (true_grad,) = torch.autograd.grad(objective, theta, retain_graph=True)

    def expected(student_logp):
        total = torch.zeros_like(theta)
        for i in range(len(seqs)):
            lp, tlp, m = student_logp[i : i + 1], teacher_logp[i : i + 1], mask[i : i + 1]
            adv, _ = f_divergence_advantages(lp.detach(), tlp, m, divergence, True, 1.0, None)
            loss, _ = policy_gradient_loss(lp, lp.detach(), adv, m, None, step_normaliser([m], "constant", MAX_LEN))
            (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
            total += float(prob[i].detach()) * g * MAX_LEN
        return total

    assert float((expected(tempered_logp) - true_grad).norm() / true_grad.norm()) < 1e-12
    assert float((expected(untempered_logp) - true_grad).norm() / true_grad.norm()) > 0.1
