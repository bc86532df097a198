"""Exact-enumeration proofs for OPD+ / standard OPD / G-OPD, and hand-built checks for REOPOLD and GRPO.

A tabular autoregressive model over a vocabulary of 3 and length 3 has 27 sequences, so
the expectation of every estimator's surrogate gradient is a finite sum that we compute
exactly and compare with the true gradient of E[Σ_t f(u_t)].
"""

import itertools
import math

import pytest
import torch

from opd.objectives.gopd import gopd_advantages
from opd.objectives.grpo import group_advantages, k3_kl
from opd.objectives.opd import reverse_kl_advantages
from opd.objectives.opd_plus import F_DIVERGENCES, f_divergence_advantages
from opd.objectives.reopold import entropy_top_fraction_mask, reopold_rewards_and_mask, reward_floor

VOCAB, LENGTH = 3, 3


def prefix_index(prefix: tuple[int, ...]) -> int:
    """Row of the logits table for a prefix: prefixes of length k come after all shorter ones."""
    offset = sum(VOCAB**k for k in range(len(prefix)))
    return offset + sum(tok * VOCAB ** (len(prefix) - 1 - i) for i, tok in enumerate(prefix))


def sequence_logprobs(table: torch.Tensor, length: int) -> torch.Tensor:
    """``[VOCAB**length, length]`` per-token log-probs of every sequence under a tabular model."""
    logp_table = table.log_softmax(-1)
    rows = []
    for seq in itertools.product(range(VOCAB), repeat=length):
        rows.append(torch.stack([logp_table[prefix_index(seq[:t]), seq[t]] for t in range(length)]))
    return torch.stack(rows)


def exact_gradients(divergence: str, unbiased: bool, length: int, seed: int = 0):
    """(expected estimator gradient, true gradient) for student table θ."""
    gen = torch.Generator().manual_seed(seed)
    n_prefixes = sum(VOCAB**k for k in range(length))
    theta = torch.randn(n_prefixes, VOCAB, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_table = torch.randn(n_prefixes, VOCAB, generator=gen, dtype=torch.float64)
    student_logp = sequence_logprobs(theta, length)  # [S, T]
    teacher_logp = sequence_logprobs(teacher_table, length)
    seq_prob = student_logp.sum(-1).exp()  # π_θ(y)
    f, _ = F_DIVERGENCES[divergence]
    objective = (seq_prob * f(teacher_logp - student_logp).sum(-1)).sum()
    (true_grad,) = torch.autograd.grad(objective, theta, retain_graph=True)

    mask = torch.ones_like(student_logp)
    discount = 1.0 if length > 1 else 0.0
    adv, _ = f_divergence_advantages(student_logp, teacher_logp, mask, divergence, unbiased, discount, log_ratio_clip=None)
    surrogate = -(seq_prob.detach()[:, None] * adv.detach() * student_logp).sum()
    (estimated,) = torch.autograd.grad(surrogate, theta)
    return estimated, true_grad


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("divergence", list(F_DIVERGENCES))
@pytest.mark.parametrize("length", [1, LENGTH])
def test_opd_plus_is_exact_for_every_f(divergence, length):
    estimated, true_grad = exact_gradients(divergence, unbiased=True, length=length)
    assert rel_error(estimated, true_grad) < 1e-12


@pytest.mark.parametrize("length", [1, LENGTH])
def test_standard_opd_is_exact_for_reverse_kl(length):
    estimated, true_grad = exact_gradients("reverse_kl", unbiased=False, length=length)
    assert rel_error(estimated, true_grad) < 1e-12


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "hellinger"])
@pytest.mark.parametrize("length", [1, LENGTH])
def test_standard_opd_is_biased_for_other_divergences(divergence, length):
    estimated, true_grad = exact_gradients(divergence, unbiased=False, length=length)
    assert rel_error(estimated, true_grad) > 0.3


def test_per_token_opd_plus_table_values():
    log_u = torch.log(torch.tensor([[0.5, 1.0, 2.0, 4.0]], dtype=torch.float64))
    s = torch.zeros_like(log_u)
    mask = torch.ones_like(log_u)
    u = log_u.exp()
    expected = {
        "reverse_kl": log_u - 1,
        "forward_kl": u,
        "jsd": 0.5 * torch.log((1 + u) / 2),
        "hellinger": u.sqrt() - 1,
        "tv": 0.5 * torch.sign(u - 1),
    }
    for name, want in expected.items():
        got, _ = f_divergence_advantages(s, log_u, mask, name, unbiased=True, log_ratio_clip=None)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_teacher_equals_student_gives_zero_advantage():
    logp = torch.log(torch.rand(4, 6, dtype=torch.float64))
    mask = torch.ones_like(logp)
    for name in F_DIVERGENCES:
        standard, _ = f_divergence_advantages(logp, logp, mask, name, unbiased=False)
        assert standard.abs().max() == 0
        plus, _ = f_divergence_advantages(logp, logp, mask, name, unbiased=True)
        constant = -1.0 if name == "reverse_kl" else {"forward_kl": 1.0}.get(name, 0.0)
        torch.testing.assert_close(plus, torch.full_like(plus, constant))
    assert gopd_advantages(logp, logp, logp, mask, 1.25).abs().max() == 0


def test_log_ratio_clip_and_fraction():
    s = torch.zeros(1, 4)
    t = torch.tensor([[-10.0, -1.0, 1.0, 8.0]])
    adv, metrics = f_divergence_advantages(s, t, torch.ones(1, 4), "forward_kl", log_ratio_clip=6.0)
    torch.testing.assert_close(adv, torch.exp(torch.tensor([[-6.0, -1.0, 1.0, 6.0]])))
    assert metrics["log_ratio_clipped_fraction"] == 0.5


def test_discount_applies_to_f_terms_only():
    s = torch.zeros(1, 3, dtype=torch.float64)
    t = torch.log(torch.tensor([[2.0, 0.5, 1.5]], dtype=torch.float64))
    mask = torch.ones_like(s)
    u = t.exp()
    f_vals = u * t  # forward KL f
    gamma = 0.5
    got, _ = f_divergence_advantages(s, t, mask, "forward_kl", unbiased=True, discount=gamma, log_ratio_clip=None)
    returns = torch.stack([f_vals[0, 0] + gamma * f_vals[0, 1] + gamma**2 * f_vals[0, 2], f_vals[0, 1] + gamma * f_vals[0, 2], f_vals[0, 2]])
    torch.testing.assert_close(got[0], -returns + u[0] * (t[0] + 1))


def test_gopd_with_lambda_one_is_opd():
    gen = torch.Generator().manual_seed(0)
    s, t, r = (torch.randn(3, 5, generator=gen) for _ in range(3))
    mask = (torch.rand(3, 5, generator=gen) > 0.2).float()
    opd = reverse_kl_advantages(s, t, mask)
    torch.testing.assert_close(gopd_advantages(s, t, None, mask, 1.0), opd)
    torch.testing.assert_close(gopd_advantages(s, t, r, mask, 1.0), opd)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        gopd_advantages(s, t, None, mask, 1.25)


@pytest.mark.parametrize("reward_scale", [0.5, 1.0, 1.25])
def test_gopd_bandit_converges_to_geometric_mixture(reward_scale):
    """Exact-expectation G-OPD updates on a one-step problem reach π ∝ π_T^λ π_ref^(1-λ)."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(5, generator=gen, dtype=torch.float64).log_softmax(-1)
    ref = torch.randn(5, generator=gen, dtype=torch.float64).log_softmax(-1)
    theta = ref.clone().requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=0.05)
    ones = torch.ones(5, 1, dtype=torch.float64)
    for _ in range(3000):
        logp = theta.log_softmax(-1)[:, None]  # every action as a batch row
        adv = gopd_advantages(logp, teacher[:, None], ref[:, None], ones, reward_scale)
        loss = -(logp.exp().detach() * adv * logp).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    target = (reward_scale * teacher + (1 - reward_scale) * ref).softmax(-1)
    torch.testing.assert_close(theta.softmax(-1).detach(), target, atol=1e-6, rtol=1e-5)


def tabular_sequence_logp(table: torch.Tensor, vocab: int, length: int) -> torch.Tensor:
    """``[vocab**length, length]`` token log-probs of every sequence; the table's rows are the prefixes."""
    seqs = list(itertools.product(range(vocab), repeat=length))
    index = lambda prefix: sum(vocab**k for k in range(len(prefix))) + sum(t * vocab ** (len(prefix) - 1 - i) for i, t in enumerate(prefix))  # noqa: E731
    rows_ST = torch.tensor([[index(seq[:t]) for t in range(length)] for seq in seqs])
    tokens_ST = torch.tensor(seqs)
    return table.log_softmax(-1)[rows_ST, tokens_ST]


def train_gopd_exactly(reward_scale: float, discount: float, steps: int = 600):
    """Exact-expectation G-OPD on a 3-token problem (vocabulary 2, 8 sequences) from π_ref; returns
    (π_θ over sequences, sequence-level target ∝ π_T^λ π_ref^(1-λ), per-state mixture's sequence distribution)."""
    vocab, length = 2, 3
    rows = sum(vocab**k for k in range(length))
    gen = torch.Generator().manual_seed(7)
    teacher = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 1.5
    ref = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 1.5
    theta = ref.clone().requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=0.1)
    teacher_logp, ref_logp = tabular_sequence_logp(teacher, vocab, length), tabular_sequence_logp(ref, vocab, length)
    mask = torch.ones_like(teacher_logp)
    for _ in range(steps):
        logp = tabular_sequence_logp(theta, vocab, length)
        adv = gopd_advantages(logp, teacher_logp, ref_logp, mask, reward_scale, discount)
        loss = -(logp.sum(-1).exp().detach()[:, None] * adv * logp).sum()  # E_y[-Σ_t A_t ℓ_t], summed exactly
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy = tabular_sequence_logp(theta.detach(), vocab, length).sum(-1).exp()
    target = (reward_scale * teacher_logp + (1 - reward_scale) * ref_logp).sum(-1).softmax(-1)
    per_state = tabular_sequence_logp(reward_scale * teacher.log_softmax(-1) + (1 - reward_scale) * ref.log_softmax(-1), vocab, length)
    return policy, target, per_state.sum(-1).exp()


@pytest.mark.parametrize("reward_scale", [0.5, 1.5])
def test_gopd_full_return_reaches_the_sequence_level_optimum(reward_scale):
    """Claim (docs/methods.md): with γ = 1, G-OPD's fixed point is π(y) ∝ π_T(y)^λ π_ref(y)^(1-λ) over whole sequences."""
    policy, target, _ = train_gopd_exactly(reward_scale, discount=1.0)
    assert 0.5 * float((policy - target).abs().sum()) < 5e-4


@pytest.mark.parametrize("reward_scale", [0.5, 1.5])
def test_gopd_per_token_form_reaches_the_per_state_mixture_instead(reward_scale):
    """Claim: with γ = 0 (per-token advantages) it converges to each state's π_T^λ π_ref^(1-λ), a different distribution."""
    policy, target, per_state = train_gopd_exactly(reward_scale, discount=0.0)
    assert 0.5 * float((policy - per_state).abs().sum()) < 5e-4
    assert 0.5 * float((per_state - target).abs().sum()) > 0.05


def test_reopold_floor_forms():
    assert reward_floor(0.2) == pytest.approx(math.log(0.2) / 0.8)
    assert reward_floor(0.2, "log_of_lambda_ratio") == pytest.approx(math.log(0.25))
    with pytest.raises(ValueError, match=r"mixture λ must be in \(0, 1\)"):
        reward_floor(1.0)


def test_reopold_exploration_drops_tail_and_refinement_uses_entropy():
    floor = reward_floor(0.2)  # ≈ -2.012
    student = torch.zeros(2, 4)
    teacher = torch.tensor([[-0.5, -3.0, 0.3, -2.0], [-5.0, -1.0, 0.0, 0.0]])
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.8, 0.3, 0.05, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    rewards, keep, m = reopold_rewards_and_mask(student, teacher, entropy, mask, step=3, switch_step=5)
    assert keep.tolist() == [[1, 0, 1, 1], [0, 1, 1, 0]]  # R < floor dropped (not clipped); padding excluded
    torch.testing.assert_close(rewards, torch.tensor([[-0.5, 0.0, 0.3, -2.0], [0.0, -1.0, 0.0, 0.0]]))
    assert m["reopold_phase"] == 0.0 and m["below_floor_fraction"] == pytest.approx(2 / 7)
    rewards, keep, m = reopold_rewards_and_mask(student, teacher, entropy, mask, step=5, switch_step=5, entropy_fraction=0.3)
    # ceil(0.3 * 7) = 3 highest-entropy valid tokens: 0.9, 0.8, 0.5 (the 7.0 is padding)
    assert keep.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    torch.testing.assert_close(rewards, torch.tensor([[0.0, floor, 0.3, 0.0], [floor, 0.0, 0.0, 0.0]]))
    assert m["reopold_phase"] == 1.0 and m["kept_fraction"] == pytest.approx(3 / 7)


def test_entropy_mask_empty_batch():
    assert entropy_top_fraction_mask(torch.ones(2, 2), torch.zeros(2, 2), 0.2).sum() == 0


def test_grpo_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(rewards, groups, unbiased=False)  # population std: exactly ±1 here
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert adv[4:].abs().max() == 0  # a group where every sample agrees teaches nothing


def test_k3_kl_is_zero_at_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0])
    assert k3_kl(logp, logp).abs().max() == 0
    assert (k3_kl(logp, torch.tensor([-0.5, -3.0])) > 0).all()


def test_entropy_selection_breaks_ties_by_position():
    """Equal entropies: the earliest valid positions (row-major) are kept, whatever the sort implementation does."""
    entropy = torch.ones(3, 7)
    mask = torch.ones(3, 7)
    mask[0, :2] = 0
    selected = entropy_top_fraction_mask(entropy, mask, 0.25)  # ceil(0.25 * 19) = 5 tokens
    expected = torch.zeros(3, 7)
    expected[0, 2:7] = 1
    assert torch.equal(selected, expected)
    entropy[2, 6] = 2.0  # a strictly larger entropy comes first, then ties by position
    expected = torch.zeros(3, 7)
    expected[0, 2:6] = 1
    expected[2, 6] = 1
    assert torch.equal(entropy_top_fraction_mask(entropy, mask, 0.25), expected)
