"""Reverse-KL on-policy distillation, "OPD" (Thinking Machines, Oct 2025; the reverse-KL member of GKD).

Per-token advantage on the student's sampled token:

    A_t = -c · (ℓ^S_t - ℓ^T_t),        ℓ^S_t = log π_θ(y_t|s_t),  ℓ^T_t = log π_T(y_t|s_t)

optionally discounted, ``A_t ← Σ_{u≥t} γ^{u-t} A_u`` (γ = 0 the per-token form, γ = 1 an
unbiased estimate of the sequence-level reverse-KL gradient). Plugged into
``policy_gradient_loss`` it descends ``KL(π_θ ‖ π_T)`` on the student's own samples.
"""

from __future__ import annotations

import torch

from .common import discounted_cumsum


def reverse_kl_advantages(
    student_logp_BT: torch.Tensor, teacher_logp_BT: torch.Tensor, mask_BT: torch.Tensor, coef: float = 1.0, discount: float = 0.0
) -> torch.Tensor:
    """``A_t = Σ_{u≥t} γ^{u-t} · (-c · (ℓ^S_u - ℓ^T_u))`` on valid tokens, zero elsewhere (no gradient)."""
    per_token_BT = -coef * (student_logp_BT.detach() - teacher_logp_BT.detach())
    return discounted_cumsum(per_token_BT, mask_BT.to(per_token_BT.dtype), discount)
