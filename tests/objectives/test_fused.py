"""The fused chunked divergence equals the materialised formula: values, and gradients for hidden states, weight and bias."""

import math

import pytest
import torch

from opd.objectives import generalized_jsd, gkd_loss, masked_mean
from opd.objectives.common import reduction_weights
from opd.objectives.divergences import on_teacher_top_k
from opd.objectives.fused import DenseTeacher, OutputHead, SparseTeacher, fused_divergence, output_head

N, H, HT, V = 29, 8, 6, 23


def _inputs(seed=0, bias=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    bias_v = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    teacher_hidden = torch.randn(N, HT, generator=g, dtype=dtype)
    teacher_weight = torch.randn(V, HT, generator=g, dtype=dtype)
    w = torch.rand(N, generator=g, dtype=dtype)
    return hidden, weight, bias_v, teacher_hidden, teacher_weight, w


def _materialised_logits(hidden, weight, bias_v, softcap):
    z = hidden @ weight.T + (bias_v if bias_v is not None else 0)
    return torch.tanh(z / softcap) * softcap if softcap else z


def _params(hidden, weight, bias_v):
    return [hidden, weight] + ([bias_v] if bias_v is not None else [])


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("softcap,bias", [(None, False), (4.0, True)])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_full_vocabulary_equals_materialised(beta, softcap, bias, chunk_size):
    hidden, weight, bias_v, t_hidden, t_weight, w = _inputs(bias=bias)
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    fused = fused_divergence(hidden, OutputHead(weight, bias_v, softcap), teacher, w, beta, 0.7, chunk_size=chunk_size)
    fused_grads = torch.autograd.grad(fused.loss, _params(hidden, weight, bias_v))

    reference_N = generalized_jsd(_materialised_logits(hidden, weight, bias_v, softcap), t_hidden @ t_weight.T, beta, 0.7)
    reference_loss = (reference_N * w).sum()
    reference_grads = torch.autograd.grad(reference_loss, _params(hidden, weight, bias_v))

    torch.testing.assert_close(fused.loss, reference_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.per_token_N, reference_N.detach(), rtol=1e-10, atol=1e-12)
    for got, want in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert fused.teacher_mass_N is None


def test_float32_matches_float64_reference_to_1e_5():
    hidden, weight, _, t_hidden, t_weight, w = _inputs()
    reference_N = generalized_jsd(hidden @ weight.T, t_hidden @ t_weight.T, 0.5, 1.0)
    reference_grad = torch.autograd.grad((reference_N * w).sum(), hidden)[0]
    h32 = hidden.detach().float().requires_grad_()
    teacher = DenseTeacher.from_hidden(t_hidden.float(), lambda h: h @ t_weight.float().T)
    fused = fused_divergence(h32, OutputHead(weight.detach().float()), teacher, w.float(), 0.5, 1.0, chunk_size=5)
    (grad,) = torch.autograd.grad(fused.loss, h32)
    assert fused.loss.dtype == torch.float32
    torch.testing.assert_close(fused.loss.double(), (reference_N * w).sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_renormalised_equals_restricted_formula(beta):
    hidden, weight, _, t_hidden, t_weight, w = _inputs(seed=1)
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    fused = fused_divergence(hidden, OutputHead(weight), teacher, w, beta, 0.8, top_k=5, chunk_size=4)
    grads = torch.autograd.grad(fused.loss, [hidden, weight])

    def jsd(s, t):
        return generalized_jsd(s, t, beta, 0.8)

    reference_N = on_teacher_top_k(hidden @ weight.T, t_hidden @ t_weight.T, jsd, k=5)
    reference_grads = torch.autograd.grad((reference_N * w).sum(), [hidden, weight])
    torch.testing.assert_close(fused.per_token_N, reference_N.detach())
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want)
    top_logp = (t_hidden @ t_weight.T / 0.8).log_softmax(-1).topk(5, -1).values
    torch.testing.assert_close(fused.teacher_mass_N, top_logp.exp().sum(-1))


def _with_tail_reference(student_logits, teacher_logits, k, beta):
    """The K+1-class distributions spelled out: the teacher's top-k probabilities and one class for the rest."""
    p_s, p_t = student_logits.softmax(-1), teacher_logits.softmax(-1)
    index = teacher_logits.topk(k, -1).indices
    q_s, q_t = p_s.gather(-1, index), p_t.gather(-1, index)
    q_s = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)
    q_t = torch.cat([q_t, 1 - q_t.sum(-1, keepdim=True)], -1)
    return generalized_jsd(q_s.log(), q_t.log(), beta, 1.0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_tail_bucket_equals_k_plus_one_classes(beta):
    hidden, weight, _, t_hidden, t_weight, w = _inputs(seed=2)
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    fused = fused_divergence(hidden, OutputHead(weight), teacher, w, beta, 1.0, top_k=4, tail=True, chunk_size=6)
    (grad,) = torch.autograd.grad(fused.loss, hidden)
    reference_N = _with_tail_reference(hidden @ weight.T, t_hidden @ t_weight.T, 4, beta)
    (reference_grad,) = torch.autograd.grad((reference_N * w).sum(), hidden)
    torch.testing.assert_close(fused.per_token_N, reference_N.detach())
    torch.testing.assert_close(grad, reference_grad)


def test_tail_bucket_with_all_tokens_is_the_full_divergence():
    hidden, weight, _, t_hidden, t_weight, w = _inputs(seed=3)
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    full = fused_divergence(hidden, OutputHead(weight), teacher, w, 0.5, 1.0)
    tail = fused_divergence(hidden, OutputHead(weight), teacher, w, 0.5, 1.0, top_k=V, tail=True)
    torch.testing.assert_close(tail.per_token_N, full.per_token_N)
    torch.testing.assert_close(tail.teacher_mass_N, torch.ones(N, dtype=torch.float64))


def test_sparse_teacher_equals_dense_teacher_top_k():
    """A teacher that only returns its top-k log-probs (an API) gives the same loss as the dense top-k path."""
    hidden, weight, _, t_hidden, t_weight, w = _inputs(seed=4)
    teacher_logp = (t_hidden @ t_weight.T).log_softmax(-1)
    top_logp, top_index = teacher_logp.topk(6, -1)
    for tail in (False, True):
        dense = fused_divergence(
            hidden, OutputHead(weight), DenseTeacher(lambda a, b: teacher_logp[a:b]), w, 0.5, 1.0, top_k=6, tail=tail
        )
        sparse = fused_divergence(hidden, OutputHead(weight), SparseTeacher(top_index, top_logp), w, 0.5, 1.0, tail=tail)
        g_dense = torch.autograd.grad(dense.loss, hidden)[0]
        g_sparse = torch.autograd.grad(sparse.loss, hidden)[0]
        torch.testing.assert_close(sparse.per_token_N, dense.per_token_N)
        torch.testing.assert_close(g_sparse, g_dense)
        torch.testing.assert_close(sparse.teacher_mass_N, top_logp.exp().sum(-1))


def test_teacher_equal_to_student_gives_zero_loss_and_gradient():
    hidden, weight, _, _, _, w = _inputs()
    teacher = DenseTeacher.from_hidden(hidden.detach(), lambda h: h @ weight.detach().T)
    for beta in (0.0, 0.5, 1.0):
        fused = fused_divergence(hidden, OutputHead(weight), teacher, w, beta, 0.9)
        (grad,) = torch.autograd.grad(fused.loss, hidden)
        assert abs(fused.loss.item()) < 1e-12 and grad.abs().max().item() < 1e-12


def test_frozen_output_layer_gets_no_gradient_and_hidden_gradient_is_unchanged():
    hidden, weight, _, t_hidden, t_weight, w = _inputs()
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    trained = fused_divergence(hidden, OutputHead(weight), teacher, w)
    frozen = fused_divergence(hidden, OutputHead(weight.detach()), teacher, w)
    torch.testing.assert_close(
        torch.autograd.grad(frozen.loss, hidden)[0], torch.autograd.grad(trained.loss, hidden, retain_graph=True)[0]
    )


def test_no_gradient_mode_and_empty_input():
    hidden, weight, _, t_hidden, t_weight, w = _inputs()
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    with torch.no_grad():
        value = fused_divergence(hidden, OutputHead(weight), teacher, w).loss
    torch.testing.assert_close(value, fused_divergence(hidden, OutputHead(weight), teacher, w).loss.detach())
    empty = fused_divergence(hidden[:0], OutputHead(weight), teacher, w[:0])
    assert empty.loss.item() == 0.0
    empty.loss.backward()
    assert weight.grad is not None and weight.grad.abs().max().item() == 0.0


def test_bad_arguments_are_refused():
    hidden, weight, _, t_hidden, t_weight, w = _inputs()
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    with pytest.raises(ValueError, match="beta"):
        fused_divergence(hidden, OutputHead(weight), teacher, w, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        fused_divergence(hidden, OutputHead(weight), teacher, w, temperature=0)
    with pytest.raises(ValueError, match="sparse teacher"):
        sparse = SparseTeacher(torch.zeros(N, 2, dtype=torch.long), torch.full((N, 2), -math.log(2)))
        fused_divergence(hidden, OutputHead(weight), sparse, w, top_k=2)


def test_bf16_autocast_is_close_to_float32():
    hidden, weight, _, t_hidden, t_weight, w = _inputs(dtype=torch.float32)
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    exact = fused_divergence(hidden, OutputHead(weight), teacher, w, chunk_size=8)
    exact_grad = torch.autograd.grad(exact.loss, hidden)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused_divergence(hidden, OutputHead(weight), teacher, w, chunk_size=8)
    low_grad = torch.autograd.grad(low.loss, hidden)[0]
    assert low.loss.dtype == torch.float32 and low_grad.dtype == torch.float32
    torch.testing.assert_close(low.loss, exact.loss, rtol=3e-2, atol=0)
    assert (low_grad - exact_grad).norm() / exact_grad.norm() < 5e-2


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean"])
def test_reduction_weights_reproduce_masked_mean(reduction):
    values = torch.randn(4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0] * 6, [1] * 6], dtype=torch.float64)
    weights = reduction_weights(mask, reduction, torch.float64)
    torch.testing.assert_close((values * weights).sum(), masked_mean(values, mask, reduction))
    assert weights[2].abs().sum() == 0


def test_gkd_fused_path_equals_checkpointed_path():
    torch.manual_seed(5)
    s_head = torch.nn.Linear(H, V, bias=True).double()
    t_head = torch.nn.Linear(HT, V, bias=False).double()
    s_hidden = torch.randn(3, 7, H, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(3, 7, HT, dtype=torch.float64)
    mask = (torch.rand(3, 7) > 0.3).float()
    out = {}
    for name, head in (("fused", OutputHead(s_head.weight, s_head.bias)), ("checkpointed", s_head)):
        result = gkd_loss(s_hidden, t_hidden, head, t_head, mask, 0.4, 0.9, 4, "seq_mean_token_mean", top_k=5)
        out[name] = (result.loss, result.per_token_BT, *torch.autograd.grad(result.loss, [s_hidden, s_head.weight, s_head.bias]))
    for got, want in zip(out["fused"], out["checkpointed"]):
        torch.testing.assert_close(got, want.detach())


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_output_head_refuses_wrapped_layers(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[1])
    head = output_head(model)
    assert head is not None and head.weight_VH is model.get_output_embeddings().weight
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    assert output_head(wrapped) is None


@pytest.mark.parametrize("top_k,softcap", [(None, None), (None, 4.0), (5, None)])
def test_sampled_token_logprobs_come_out_of_the_same_loop(top_k, softcap):
    """With token ids, the loop also gives log softmax(z)[id] at τ = 1 for student and dense teacher — the numbers
    the GKD/OPSD ``kl`` diagnostic needs — without changing the loss or its gradient."""
    hidden, weight, _, t_hidden, t_weight, w = _inputs(seed=6)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    teacher = DenseTeacher.from_hidden(t_hidden, lambda h: h @ t_weight.T)
    plain = fused_divergence(hidden, OutputHead(weight, None, softcap), teacher, w, 0.5, 0.8, top_k=top_k, chunk_size=4)
    with_ids = fused_divergence(
        hidden, OutputHead(weight, None, softcap), teacher, w, 0.5, 0.8, top_k=top_k, chunk_size=4, token_ids_N=ids
    )
    student_logp = _materialised_logits(hidden, weight, None, softcap).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    teacher_logp = (t_hidden @ t_weight.T).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(with_ids.student_token_logp_N, student_logp.detach().float())
    torch.testing.assert_close(with_ids.teacher_token_logp_N, teacher_logp.float())
    torch.testing.assert_close(with_ids.loss, plain.loss)
    torch.testing.assert_close(torch.autograd.grad(with_ids.loss, hidden)[0], torch.autograd.grad(plain.loss, hidden)[0])
    top_logp, top_index = (t_hidden @ t_weight.T).log_softmax(-1).topk(6, -1)
    sparse = fused_divergence(hidden, OutputHead(weight), SparseTeacher(top_index, top_logp), w, 0.5, 1.0, token_ids_N=ids)
    plain_logp = (hidden @ weight.T).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(sparse.student_token_logp_N, plain_logp.detach().float())
    assert sparse.teacher_token_logp_N is None  # a top-k teacher's log-prob of the token comes from the teacher itself
