"""Objectives: gradients equal their formulas; chunked equals unchunked; no NaN from -inf."""

import torch

from opd.objectives import (
    discounted_cumsum,
    generalized_jsd,
    gkd_loss,
    masked_mean,
    policy_gradient_loss,
    reverse_kl_advantages,
    sft_loss,
)

torch.manual_seed(0)


def test_policy_gradient_gradient_is_minus_advantage_over_n():
    logp = torch.randn(3, 5, dtype=torch.float64).requires_grad_()
    adv = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float64)
    loss, _ = policy_gradient_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask / mask.sum())
    assert loss.item() == (-(adv * mask).sum() / mask.sum()).item()


def test_ppo_clip_zeroes_gradient_outside_trust_region():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.5, 0.0]], dtype=torch.float64)  # ratio e^0.5 ≈ 1.65 on the first token
    adv = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    loss, metrics = policy_gradient_loss(logp, old, adv, torch.ones(1, 2), clip_eps=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == -0.5
    assert metrics["clip_fraction"] == 0.5


def test_masked_mean_reductions():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == 16 / 4
    assert masked_mean(values, mask, "seq_mean_token_mean").item() == (2 + 10) / 2
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_discounted_cumsum():
    values = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(discounted_cumsum(values, mask, 0.0), torch.tensor([[1.0, 2.0, 4.0, 0.0]]))
    torch.testing.assert_close(discounted_cumsum(values, mask, 0.5), torch.tensor([[1 + 1 + 1.0, 2 + 2.0, 4.0, 0.0]]))
    torch.testing.assert_close(discounted_cumsum(values, mask, 1.0), torch.tensor([[7.0, 6.0, 4.0, 0.0]]))


def test_reverse_kl_opd_is_unbiased_on_a_bandit():
    """Σ_y π(y)·∇surrogate(y), summed exactly over the vocabulary, equals ∇KL(π_θ ‖ π_T)."""
    vocab = 6
    theta = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    teacher_logp = torch.randn(vocab, dtype=torch.float64).log_softmax(-1)
    logp = theta.log_softmax(-1)
    probs = logp.exp().detach()
    expected_grad = torch.zeros(vocab, dtype=torch.float64)
    for y in range(vocab):
        logp_y = logp[y].view(1, 1)
        adv = reverse_kl_advantages(logp_y, teacher_logp[y].view(1, 1), torch.ones(1, 1))
        loss, _ = policy_gradient_loss(logp_y, logp_y.detach(), adv, torch.ones(1, 1))
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        expected_grad += probs[y] * grad
    kl = (logp.exp() * (logp - teacher_logp)).sum()
    (true_grad,) = torch.autograd.grad(kl, theta)
    torch.testing.assert_close(expected_grad, true_grad, rtol=1e-12, atol=1e-12)


def test_opd_advantage_formula_and_discount():
    s = torch.tensor([[-1.0, -2.0, -0.5]])
    t = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.ones(1, 3)
    torch.testing.assert_close(reverse_kl_advantages(s, t, mask, coef=2.0), torch.tensor([[-1.0, 2.0, 0.0]]))
    torch.testing.assert_close(reverse_kl_advantages(s, t, mask, discount=1.0), torch.tensor([[0.5, 1.0, 0.0]]))


def direct_jsd(s_logits, t_logits, beta, tau):
    p_s, p_t = (s_logits / tau).softmax(-1), (t_logits / tau).softmax(-1)
    m = beta * p_t + (1 - beta) * p_s
    return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)


def test_generalized_jsd_matches_definition_and_end_points():
    s, t = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    for beta in (0.1, 0.5, 0.9):
        torch.testing.assert_close(generalized_jsd(s, t, beta, 0.9), direct_jsd(s, t, beta, 0.9))
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    forward = (p_t * (p_t.log() - p_s.log())).sum(-1)
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0, 1.0), forward)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0, 1.0), reverse)
    assert generalized_jsd(s, s, 0.5).abs().max() < 1e-6  # teacher = student ⇒ zero


def test_jsd_with_impossible_tokens_has_no_nan():
    s = torch.tensor([[0.0, 1.0, float("-inf")]], requires_grad=True)
    t = torch.tensor([[float("-inf"), 1.0, 0.5]])
    for beta in (0.0, 0.5, 1.0):
        value = generalized_jsd(s, t, beta)
        if beta == 0.5:
            value.sum().backward()
            assert torch.isfinite(s.grad[:, :2]).all()
        assert torch.isfinite(value).all() or beta in (0.0, 1.0)  # KL to a zero-mass token is +inf by definition


def _gkd_inputs(n_rows=3, n_tok=5, hidden=8, vocab=11):
    torch.manual_seed(3)
    s_head = torch.nn.Linear(hidden, vocab, bias=False).double()
    t_head = torch.nn.Linear(hidden, vocab, bias=False).double()
    s_hidden = torch.randn(n_rows, n_tok, hidden, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(n_rows, n_tok, hidden, dtype=torch.float64)
    mask = (torch.rand(n_rows, n_tok) > 0.3).float()
    return s_head, t_head, s_hidden, t_hidden, mask


def test_gkd_chunked_equals_unchunked_values_and_gradients():
    s_head, t_head, s_hidden, t_hidden, mask = _gkd_inputs()
    results = []
    for chunk in (1, 3, 1000):
        s_hidden.grad = None
        s_head.zero_grad()
        loss, per_token, *_ = gkd_loss(s_hidden, t_hidden, s_head, t_head, mask, beta=0.3, temperature=0.9, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), per_token.detach(), s_hidden.grad.clone(), s_head.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gkd_matches_materialised_formula():
    s_head, t_head, s_hidden, t_hidden, mask = _gkd_inputs()
    loss, *_ = gkd_loss(s_hidden, t_hidden, s_head, t_head, mask, beta=0.5, temperature=1.0, chunk_size=4)
    (grad,) = torch.autograd.grad(loss, s_hidden)
    reference = direct_jsd(s_head(s_hidden), t_head(t_hidden).detach(), 0.5, 1.0)
    reference_loss = (reference * mask).sum() / mask.sum()
    (reference_grad,) = torch.autograd.grad(reference_loss, s_hidden)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-12)


def test_gkd_zero_when_teacher_is_student():
    s_head, _, s_hidden, _, mask = _gkd_inputs()
    loss, *_ = gkd_loss(s_hidden, s_hidden.detach(), s_head, s_head, mask)
    assert abs(loss.item()) < 1e-7


def test_sft_loss_is_masked_nll():
    logp = torch.tensor([[-1.0, -3.0], [-2.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert sft_loss(logp, mask).item() == 2.0


def test_top_k_restriction():
    from functools import partial

    from opd.objectives.divergences import on_teacher_top_k

    s, t = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    jsd = partial(generalized_jsd, beta=0.5)
    torch.testing.assert_close(on_teacher_top_k(s, t, jsd, k=9), jsd(s, t))
    idx = t.topk(3, -1).indices
    torch.testing.assert_close(on_teacher_top_k(s, t, jsd, k=3), jsd(s.gather(-1, idx), t.gather(-1, idx)))
