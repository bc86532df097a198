"""Divergences between next-token distributions, per position, from logits.

All take ``[N, V]`` logits and return ``[N]`` per-token values (float32, or float64 for float64 input). Tokens with zero
probability (logit ``-inf``) contribute exactly zero, never NaN.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(logp_NV: torch.Tensor, logq_NV: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)``, with ``0 · log 0 = 0``."""
    p_NV = logp_NV.exp()
    diff_NV = torch.where(p_NV > 0, logp_NV - logq_NV, torch.zeros_like(logp_NV))
    return (p_NV * diff_NV).sum(-1)


def generalized_jsd(
    student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence of Agarwal et al. 2024 (GKD, arXiv 2306.13649):

        D_β(P_T ‖ P_S) = β·KL(P_T ‖ M) + (1-β)·KL(P_S ‖ M),   M = β·P_T + (1-β)·P_S

    with both logit sets divided by ``temperature`` first. The end points are taken as
    the explicit KLs: β = 0 → KL(P_T ‖ P_S) (forward), β = 1 → KL(P_S ‖ P_T) (reverse).
    Gradients flow into the student, through M as well.
    """
    logp_s_NV = (_at_least_float32(student_logits_NV) / temperature).log_softmax(-1)
    logp_t_NV = (_at_least_float32(teacher_logits_NV) / temperature).log_softmax(-1)
    if beta == 0:
        return _kl(logp_t_NV, logp_s_NV)
    if beta == 1:
        return _kl(logp_s_NV, logp_t_NV)
    log_m_NV = torch.logaddexp(logp_t_NV + math.log(beta), logp_s_NV + math.log(1 - beta))
    return beta * _kl(logp_t_NV, log_m_NV) + (1 - beta) * _kl(logp_s_NV, log_m_NV)


def on_teacher_top_k(student_logits_NV, teacher_logits_NV, divergence, k: int) -> torch.Tensor:
    """``divergence`` restricted to the teacher's top-``k`` tokens at each position (both renormalised there)."""
    index_NK = teacher_logits_NV.topk(min(k, teacher_logits_NV.shape[-1]), dim=-1).indices
    return divergence(student_logits_NV.gather(-1, index_NK), teacher_logits_NV.gather(-1, index_NK))


def _chunk_divergence(student_hidden, teacher_hidden, student_project, teacher_project, divergence):
    with torch.no_grad():
        teacher_logits = teacher_project(teacher_hidden)
    return divergence(student_project(student_hidden), teacher_logits)


def streamed_divergence(
    student_hidden_NH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    student_project: Callable[[torch.Tensor], torch.Tensor],
    teacher_project: Callable[[torch.Tensor], torch.Tensor],
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``divergence(student_logits, teacher_logits)`` per token, forming logits ``chunk_size`` tokens at a time.

    Both models' logits exist only for one chunk; with gradients on, each chunk is
    recomputed during backward, so memory grows with ``chunk_size × V``, not ``N × V``.
    """
    out = []
    for start in range(0, student_hidden_NH.shape[0], chunk_size):
        args = (
            student_hidden_NH[start : start + chunk_size],
            teacher_hidden_NH[start : start + chunk_size].detach(),
            student_project,
            teacher_project,
            divergence,
        )
        if torch.is_grad_enabled() and student_hidden_NH.requires_grad:
            out.append(checkpoint(_chunk_divergence, *args, use_reentrant=False))
        else:
            out.append(_chunk_divergence(*args))
    return torch.cat(out) if out else student_hidden_NH.new_zeros(0, dtype=torch.float32)
