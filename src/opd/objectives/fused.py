"""Fused, chunked full-vocabulary divergence: the student's logits never exist for more than one chunk.

For every position ``n`` with weight ``w_n`` (the reduction: ``1/N`` for a token mean),

    loss = Σ_n w_n · D_β(P_T(·|n) ‖ P_S(·|n)),   P_S = softmax(softcap(h_n Wᵀ + b) / τ),

where ``D_β`` is the generalised JSD of GKD (arXiv 2306.13649, see ``generalized_jsd``):
β = 0 is the forward KL ``KL(P_T ‖ P_S)``, β = 1 the reverse KL ``KL(P_S ‖ P_T)``.

Inputs are the student's final hidden states and output layer, and a teacher given either
as dense logits produced chunk by chunk (``DenseTeacher``, e.g. its own hidden states and
output layer) or as top-k log-probs only (``SparseTeacher``, e.g. an API that returns
``top_logprobs``). A custom autograd function walks the tokens ``chunk_size`` rows at a time:
it forms the chunk's logits, the per-token divergence and — when gradients are wanted — the
gradient with respect to the chunk's logits, which it immediately folds into the gradients of
the hidden states (``[N, H]``) and of the output layer (``[V, H]``). The backward pass only
scales those by the incoming gradient, so no logits are recomputed or kept: peak memory is a
few ``chunk_size × V`` buffers plus the gradients themselves, whatever ``N`` is.

The gradient with respect to the tempered student logits ``u = z/τ`` is analytic (``s``, ``t``
student and teacher log-probs, ``p = exp(s)``, ``m = log(β e^t + (1-β) e^s)``):

    forward KL (β = 0):  ∂D/∂u = p - e^t
    reverse KL (β = 1):  ∂D/∂u = p ⊙ (s - t - KL(P_S ‖ P_T))
    JSD_β:               ∂D/∂u = (1-β) · p ⊙ (s - m - KL(P_S ‖ M))

Top-k modes (``top_k`` with a dense teacher, or any sparse teacher) restrict the divergence to
the teacher's top-k tokens, either renormalised there or with a *tail bucket*: the probability
mass outside the top-k as one extra class, so that a teacher that only reveals its top-k still
defines a proper distribution. Their chunk gradient is taken by autograd on the chunk alone.

Given ``token_ids_N`` (the tokens actually in the sequence), the same loop also returns the
untempered log-probs ``log softmax(z)[id]`` of those tokens under the student and — for a dense
teacher — the teacher: what a reverse-KL estimate ``mean(ℓ^S - ℓ^T)`` needs, read off logits the
chunk has already formed, so it costs two log-sum-exps per chunk rather than a second pass of
both output layers over the whole vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .divergences import generalized_jsd

# Rows per chunk when the caller does not choose: about 2^25 logits (128 MiB in float32) per buffer.
_AUTO_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class OutputHead:
    """A linear output layer, ``logits = softcap(h Wᵀ + b)`` (``softcap(x) = c·tanh(x/c)`` when set)."""

    weight_VH: torch.Tensor
    bias_V: torch.Tensor | None = None
    softcap: float | None = None


def output_head(model: torch.nn.Module) -> OutputHead | None:
    """The model's output layer as an ``OutputHead``, or None when it is not a plain ``nn.Linear``
    (e.g. wrapped by a LoRA adapter), in which case callers fall back to an autograd projection."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return None
    return OutputHead(head.weight, head.bias, getattr(model.config, "final_logit_softcapping", None) or None)


class DenseTeacher(NamedTuple):
    """A teacher that gives full logits ``[stop - start, V]`` for rows ``start:stop`` on request (before temperature)."""

    logits: Callable[[int, int], torch.Tensor]

    @classmethod
    def from_hidden(cls, hidden_NH: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> "DenseTeacher":
        return cls(lambda start, stop: project(hidden_NH[start:stop].detach()))


class SparseTeacher(NamedTuple):
    """A teacher known only through its top-k: token ids ``[N, K]`` and their log-probs ``[N, K]`` over the
    full vocabulary, already at the temperature the loss uses."""

    index_NK: torch.Tensor
    logp_NK: torch.Tensor


class FusedDivergence(NamedTuple):
    loss: torch.Tensor  # Σ_n w_n D_n, differentiable with respect to the student's hidden states and output layer
    per_token_N: torch.Tensor  # D_n, no gradient
    teacher_mass_N: torch.Tensor | None  # teacher probability on the kept top-k tokens; None over the full vocabulary
    student_token_logp_N: torch.Tensor | None = None  # log softmax(z_S)[id] at τ = 1 (with token_ids_N), no gradient
    teacher_token_logp_N: torch.Tensor | None = None  # log softmax(z_T)[id] at τ = 1 (with token_ids_N, dense teacher)


def auto_chunk_size(vocab_size: int) -> int:
    return max(1, _AUTO_CHUNK_ELEMENTS // max(vocab_size, 1))


def fused_divergence(
    student_hidden_NH: torch.Tensor,
    student_head: OutputHead,
    teacher: DenseTeacher | SparseTeacher,
    weight_N: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    tail: bool = False,
    chunk_size: int | None = None,
    token_ids_N: torch.Tensor | None = None,
) -> FusedDivergence:
    """``Σ_n w_n D_β(P_T ‖ P_S)`` over the student's and teacher's next-token distributions, chunk by chunk.

    ``top_k`` (dense teacher only; a sparse teacher's K is its own) keeps the teacher's top-k tokens,
    renormalised there, or with ``tail`` plus one class holding the rest of the mass. The
    temperature divides the student's logits and a dense teacher's logits; a sparse teacher's
    log-probs are used as given. ``chunk_size`` None picks about 2^25 logits per chunk. ``token_ids_N``:
    also return the untempered log-probs of these tokens (``student_token_logp_N``, ``teacher_token_logp_N``).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher, SparseTeacher) and top_k is not None:
        raise ValueError("a sparse teacher's top-k is the one it gave; leave top_k unset")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    vocab = student_head.weight_VH.shape[0]
    spec = _Spec(beta, temperature, top_k, tail, chunk_size or auto_chunk_size(vocab), student_head.softcap)
    sampled = None if token_ids_N is None else _SampledTokens(token_ids_N, isinstance(teacher, DenseTeacher))
    loss, per_token_N, mass_N = _FusedDivergenceFn.apply(
        student_hidden_NH, student_head.weight_VH, student_head.bias_V, weight_N.detach(), spec, teacher, sampled
    )
    return FusedDivergence(
        loss, per_token_N, mass_N if spec.reports_mass(teacher) else None,
        None if sampled is None else sampled.student_N, None if sampled is None else sampled.teacher_N,
    )


class _SampledTokens:
    """Collects, chunk by chunk, the untempered log-probs of the given tokens (filled in during the forward)."""

    def __init__(self, ids_N: torch.Tensor, with_teacher: bool):
        self.ids_N = ids_N
        self.student_N = torch.zeros(ids_N.shape, dtype=torch.float32, device=ids_N.device)
        self.teacher_N = torch.zeros_like(self.student_N) if with_teacher else None

    def record(self, start: int, stop: int, student_logits_CV: torch.Tensor, teacher_logits_CV: torch.Tensor | None):
        ids_C1 = self.ids_N[start:stop, None]
        self.student_N[start:stop] = _untempered_logp(student_logits_CV, ids_C1)
        if self.teacher_N is not None and teacher_logits_CV is not None:
            self.teacher_N[start:stop] = _untempered_logp(teacher_logits_CV, ids_C1)


def _untempered_logp(logits_CV: torch.Tensor, ids_C1: torch.Tensor) -> torch.Tensor:
    """``log softmax(z)[id]`` per row, without forming the ``[C, V]`` log-softmax."""
    return (logits_CV.gather(-1, ids_C1).squeeze(-1) - logits_CV.logsumexp(-1)).float()


@dataclass(frozen=True)
class _Spec:
    beta: float
    temperature: float
    top_k: int | None
    tail: bool
    chunk_size: int
    softcap: float | None

    def reports_mass(self, teacher) -> bool:
        return isinstance(teacher, SparseTeacher) or self.top_k is not None


class _FusedDivergenceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, weight_N, spec: _Spec, teacher, sampled: "_SampledTokens | None"):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias_V is not None and ctx.needs_input_grad[2]
        want_any = want_hidden or want_weight or want_bias
        dtype = _compute_dtype(weight_VH)
        weight_c = weight_VH.to(dtype)
        bias_c = None if bias_V is None else bias_V.to(dtype)
        n_rows, acc_dtype = hidden_NH.shape[0], torch.promote_types(dtype, torch.float32)
        per_token_N = torch.zeros(n_rows, dtype=acc_dtype, device=hidden_NH.device)
        mass_N = torch.ones(n_rows, dtype=acc_dtype, device=hidden_NH.device)
        grad_hidden_NH = torch.zeros_like(hidden_NH) if want_hidden else None
        grad_weight_VH = torch.zeros(weight_VH.shape, dtype=acc_dtype, device=weight_VH.device) if want_weight else None
        grad_bias_V = torch.zeros(bias_V.shape, dtype=acc_dtype, device=bias_V.device) if want_bias else None
        with torch.autocast(hidden_NH.device.type, enabled=False):
            for start in range(0, n_rows, spec.chunk_size):
                stop = min(start + spec.chunk_size, n_rows)
                hidden_c = hidden_NH[start:stop].to(dtype)
                logits_CV = _softcap(F.linear(hidden_c, weight_c, bias_c).to(acc_dtype), spec.softcap)
                values_C, grad_CV, mass_C = _chunk(
                    logits_CV, teacher, start, stop, weight_N[start:stop].to(acc_dtype), spec, want_any, sampled
                )
                per_token_N[start:stop] = values_C
                if mass_C is not None:
                    mass_N[start:stop] = mass_C
                if grad_CV is None:
                    continue
                if spec.softcap:  # d softcap(x)/dx = 1 - (softcap(x)/c)²
                    grad_CV.mul_(1 - (logits_CV / spec.softcap).square())
                del logits_CV
                grad_c = grad_CV.to(dtype)
                if want_hidden:
                    grad_hidden_NH[start:stop] = (grad_c @ weight_c).to(hidden_NH.dtype)
                if want_weight:
                    grad_weight_VH.add_(grad_c.T @ hidden_c)
                if want_bias:
                    grad_bias_V.add_(grad_CV.sum(0))
        loss = (per_token_N * weight_N.to(acc_dtype)).sum()
        ctx.mark_non_differentiable(per_token_N, mass_N)
        ctx.save_for_backward(grad_hidden_NH, grad_weight_VH, grad_bias_V)
        ctx.param_dtypes = (weight_VH.dtype, None if bias_V is None else bias_V.dtype)
        return loss, per_token_N, mass_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_mass):
        grads = ctx.saved_tensors
        dtypes = (grads[0].dtype if grads[0] is not None else None, *ctx.param_dtypes)
        unit = bool(grad_loss == 1)  # the usual case: hand the accumulated gradients over without a copy
        hidden, weight, bias = (
            None if g is None else (g if unit else g * grad_loss).to(dtype) for g, dtype in zip(grads, dtypes)
        )
        return hidden, weight, bias, None, None, None, None


def _chunk(logits_CV, teacher, start, stop, weight_C, spec: _Spec, want_grad: bool, sampled: _SampledTokens | None = None):
    """``(D_C, ∂(Σ w·D)/∂logits or None, teacher mass or None)`` for one chunk of student logits; the sampled
    tokens' untempered log-probs go to ``sampled`` when given."""
    if isinstance(teacher, SparseTeacher):
        if sampled is not None:
            sampled.record(start, stop, logits_CV, None)
        teacher_logp_CK = teacher.logp_NK[start:stop].to(logits_CV.dtype)
        return _chunk_top_k(logits_CV, teacher.index_NK[start:stop], teacher_logp_CK, weight_C, spec, want_grad)
    teacher_logits_CV = teacher.logits(start, stop).to(logits_CV.dtype)
    if sampled is not None:
        sampled.record(start, stop, logits_CV, teacher_logits_CV)
    teacher_logp_CV = (teacher_logits_CV / spec.temperature).log_softmax(-1)
    del teacher_logits_CV
    if spec.top_k is not None:
        teacher_logp_CK, index_CK = teacher_logp_CV.topk(min(spec.top_k, teacher_logp_CV.shape[-1]), dim=-1)
        del teacher_logp_CV
        return _chunk_top_k(logits_CV, index_CK, teacher_logp_CK, weight_C, spec, want_grad)
    logp_CV = (logits_CV / spec.temperature).log_softmax(-1)
    values_C, grad_CV = _full_vocab(logp_CV, teacher_logp_CV, spec.beta, want_grad)
    if grad_CV is not None:
        grad_CV.mul_(weight_C[:, None] / spec.temperature)
    return values_C, grad_CV, None


def _full_vocab(logp_CV: torch.Tensor, teacher_logp_CV: torch.Tensor, beta: float, want_grad: bool):
    """Per-row ``D_β`` and its gradient with respect to the tempered logits (see the module docstring)."""
    if beta == 0:  # KL(P_T ‖ P_S)
        teacher_p_CV = teacher_logp_CV.exp()
        values_C = _weighted_sum(teacher_p_CV, teacher_logp_CV - logp_CV)
        return values_C, (logp_CV.exp_().sub_(teacher_p_CV) if want_grad else None)
    if beta == 1:  # KL(P_S ‖ P_T)
        return _reverse_kl(logp_CV, teacher_logp_CV, want_grad)
    log_m_CV = torch.logaddexp(teacher_logp_CV + math.log(beta), logp_CV + math.log(1 - beta))
    teacher_term_C = _weighted_sum(teacher_logp_CV.exp(), teacher_logp_CV - log_m_CV)
    del teacher_logp_CV
    student_kl_C, grad_CV = _reverse_kl(logp_CV, log_m_CV, want_grad)
    values_C = beta * teacher_term_C + (1 - beta) * student_kl_C
    return values_C, (grad_CV.mul_(1 - beta) if grad_CV is not None else None)


def _reverse_kl(logp_CV: torch.Tensor, logq_CV: torch.Tensor, want_grad: bool):
    """``KL(P ‖ Q)`` per row and ``∂KL/∂u = p ⊙ (log p - log q - KL)`` for ``log p = log_softmax(u)``; 0·log 0 = 0."""
    p_CV = logp_CV.exp()
    diff_CV = (logp_CV - logq_CV).masked_fill_(p_CV == 0, 0.0)
    kl_C = (p_CV * diff_CV).sum(-1)
    if not want_grad:
        return kl_C, None
    return kl_C, diff_CV.sub_(kl_C[:, None]).mul_(p_CV)


def _weighted_sum(p_CV: torch.Tensor, diff_CV: torch.Tensor) -> torch.Tensor:
    """``Σ_v p_v · diff_v`` with terms where ``p_v = 0`` counted as exactly 0 (never ``0 · ∞``)."""
    return diff_CV.mul_(p_CV).masked_fill_(p_CV == 0, 0.0).sum(-1)


def _chunk_top_k(logits_CV, index_CK, teacher_logp_CK, weight_C, spec: _Spec, want_grad: bool):
    """The divergence on the teacher's top-k tokens ``index_CK`` (log-probs ``teacher_logp_CK``), renormalised or with a tail."""
    mass_C = teacher_logp_CK.exp().sum(-1)
    logits_CV = logits_CV.detach().requires_grad_(want_grad)
    with torch.enable_grad() if want_grad else torch.no_grad():
        logp_CK = (logits_CV / spec.temperature).log_softmax(-1).gather(-1, index_CK)
        if spec.tail:
            logp_CK, teacher_logp_CK = _with_tail(logp_CK), _with_tail(teacher_logp_CK)
        # generalized_jsd renormalises its inputs: a no-op with the tail, the renormalisation without it
        values_C = generalized_jsd(logp_CK, teacher_logp_CK, beta=spec.beta, temperature=1.0)
        if not want_grad:
            return values_C, None, mass_C
        (grad_CV,) = torch.autograd.grad((values_C * weight_C).sum(), logits_CV)
    return values_C.detach(), grad_CV, mass_C


def _with_tail(logp_CK: torch.Tensor) -> torch.Tensor:
    """Append ``log(1 - Σ_k p_k)``, the mass outside the given tokens, as one more class."""
    covered_C = logp_CK.logsumexp(-1).clamp(max=0.0)
    tail_C = torch.where(covered_C > -math.log(2), torch.log(-torch.expm1(covered_C)), torch.log1p(-torch.exp(covered_C)))
    return torch.cat([logp_CK, tail_C[:, None]], dim=-1)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits
