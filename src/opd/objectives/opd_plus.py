"""OPD+: unbiased on-policy distillation advantages for any f-divergence (arXiv 2606.01039).

With the per-token likelihood ratio ``u_t = π_T(y_t|s_t) / π_θ(y_t|s_t)`` and the objective
``D_f = E_{y~π_θ}[Σ_t f(u_t)]``, the exact gradient is

    ∇D_f = E[Σ_t (Σ_{t'≥t} f(u_t') - u_t f'(u_t)) ∇log π_θ(y_t|s_t)]

so the descent advantages are

    standard OPD:  A_t = -Σ_{t'≥t} γ^{t'-t} f(u_t')                    (biased unless f = -log u)
    OPD+:          A_t = -Σ_{t'≥t} γ^{t'-t} f(u_t') + u_t f'(u_t)      (unbiased for γ = 1)

γ = 0 gives the per-token forms ``-f(u_t)`` and ``-f(u_t) + u_t f'(u_t)`` (the paper's
default; exact for one-step problems). Only the ``f`` terms are discounted: the
``u f'`` correction stays local. ``log u`` is clipped to ±``log_ratio_clip`` before use.

| divergence | f(u) | OPD+ per-token A |
|---|---|---|
| reverse_kl | -ln u | ln u - 1 |
| forward_kl | u ln u | u |
| jsd (β=½) | ½[u ln u - (1+u) ln((1+u)/2)] | ½ ln((1+u)/2) |
| hellinger | (√u - 1)² | √u - 1 |
| tv | ½\\|u - 1\\| | ½ sign(u - 1) |
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from .common import discounted_cumsum

Divergence = Literal["reverse_kl", "forward_kl", "jsd", "hellinger", "tv"]
LOG_HALF = math.log(0.5)


def _softplus_log_mean(log_u: torch.Tensor) -> torch.Tensor:
    """ln((1+u)/2) computed stably from ln u."""
    return torch.logaddexp(torch.zeros_like(log_u), log_u) + LOG_HALF


def _u_times(log_u: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``u · factor`` with the limit 0 at u = 0 (log u = -inf), where ``factor`` may be -inf (``u ln u → 0``)."""
    return torch.where(log_u == float("-inf"), torch.zeros_like(log_u), log_u.exp() * factor)


# Each entry: (f(u), u·f'(u)), both as functions of log u; at u = 0 (a teacher log-prob of -inf) every entry
# takes its limit, finite for all but reverse KL (f = -ln u → +inf: the divergence is infinite there).
F_DIVERGENCES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "reverse_kl": (lambda lu: -lu, lambda lu: -torch.ones_like(lu)),
    "forward_kl": (lambda lu: _u_times(lu, lu), lambda lu: _u_times(lu, lu + 1)),
    "jsd": (
        lambda lu: 0.5 * (_u_times(lu, lu) - (1 + lu.exp()) * _softplus_log_mean(lu)),
        lambda lu: 0.5 * _u_times(lu, lu - _softplus_log_mean(lu)),
    ),
    "hellinger": (lambda lu: (torch.exp(lu / 2) - 1) ** 2, lambda lu: lu.exp() - torch.exp(lu / 2)),
    "tv": (lambda lu: 0.5 * (lu.exp() - 1).abs(), lambda lu: 0.5 * lu.exp() * torch.sign(lu)),
}


def clipped_log_ratio(
    student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, float]:
    """``(log u, clipped fraction)`` with ``log u = ℓ^T - ℓ^S`` clipped to ±clip (no gradient)."""
    log_u_BT = (teacher_logp_BT - student_logp_BT).detach()
    if clip is None:
        return log_u_BT, 0.0
    valid = mask_BT.bool()
    clipped = float(((log_u_BT.abs() > clip) & valid).sum() / valid.sum().clamp(min=1))
    return log_u_BT.clamp(-clip, clip), clipped


def f_divergence_advantages(
    student_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    divergence: Divergence = "reverse_kl",
    unbiased: bool = True,
    discount: float = 0.0,
    log_ratio_clip: float | None = 6.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OPD+ (``unbiased=True``) or standard OPD (``unbiased=False``) advantages; see the module docstring."""
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {', '.join(F_DIVERGENCES)}")
    f, u_f_prime = F_DIVERGENCES[divergence]
    mask_BT = mask_BT.to(student_logp_BT.dtype)
    log_u_BT, clipped = clipped_log_ratio(student_logp_BT, teacher_logp_BT, mask_BT, log_ratio_clip)
    advantages_BT = -discounted_cumsum(f(log_u_BT), mask_BT, discount)
    if unbiased:
        advantages_BT = advantages_BT + torch.where(mask_BT.bool(), u_f_prime(log_u_BT), torch.zeros_like(log_u_BT))
    return advantages_BT, {"log_ratio_clipped_fraction": clipped}
