"""REOPOLD: relaxed on-policy distillation (arXiv 2603.11137).

Token reward ``R_t = sg(ℓ^T_t - ℓ^S_t)``, relaxed three ways:

1. Mixture-based reward clipping: ``R̂_t = max(R_t, floor)`` with
   ``floor = log(λ)/(1-λ)`` (default) or ``log(λ/(1-λ))`` (the other reading), λ = 0.2.
2. Entropy-based token selection: keep the tokens whose student entropy is in the top
   β fraction of the batch's valid tokens (β = 0.2).
3. Exploration → refinement: before ``switch_step`` keep only tokens with ``R_t ≥ floor``
   (the heavy negative tail is dropped, not clipped); from ``switch_step`` on, use the
   entropy mask with clipped rewards.

    J = (1/Σ M) Σ_t ρ_t · R̂_t · M_t,     ρ = exp(ℓ^θ - sg(ℓ^old)) unclipped
"""

from __future__ import annotations

import math
from typing import Literal

import torch

FloorForm = Literal["log_lambda_over_one_minus_lambda", "log_of_lambda_ratio"]


def reward_floor(mixture_lambda: float, form: FloorForm = "log_lambda_over_one_minus_lambda") -> float:
    """``log(λ)/(1-λ)`` or ``log(λ/(1-λ))``."""
    if not 0 < mixture_lambda < 1:
        raise ValueError(f"mixture λ must be in (0, 1), got {mixture_lambda}")
    if form == "log_lambda_over_one_minus_lambda":
        return math.log(mixture_lambda) / (1 - mixture_lambda)
    if form == "log_of_lambda_ratio":
        return math.log(mixture_lambda / (1 - mixture_lambda))
    raise ValueError(f"unknown floor form {form!r}")


def entropy_top_fraction_mask(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 on the ``ceil(fraction · n_valid)`` valid tokens of highest entropy (ties broken by position)."""
    valid = mask_BT.bool()
    n_valid = int(valid.sum())
    keep = math.ceil(fraction * n_valid)
    selected = torch.zeros_like(valid)
    if keep == 0:
        return selected.to(mask_BT.dtype)
    scores = entropy_BT.detach().masked_fill(~valid, float("-inf")).flatten()
    top = torch.sort(scores, descending=True, stable=True).indices[:keep]  # stable: equal entropies go by position
    selected.view(-1)[top] = True
    return (selected & valid).to(mask_BT.dtype)


def reopold_rewards_and_mask(
    student_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    entropy_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    step: int,
    switch_step: int,
    mixture_lambda: float = 0.2,
    entropy_fraction: float = 0.2,
    floor_form: FloorForm = "log_lambda_over_one_minus_lambda",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(R̂_BT, M_BT, metrics)`` for the current phase; plug into ``policy_gradient_loss`` as (advantages, mask)."""
    floor = reward_floor(mixture_lambda, floor_form)
    rewards_BT = (teacher_logp_BT - student_logp_BT).detach()
    valid_BT = mask_BT.to(rewards_BT.dtype)
    if step < switch_step:
        keep_BT = valid_BT * (rewards_BT >= floor).to(rewards_BT.dtype)
        phase = 0.0
    else:
        keep_BT = entropy_top_fraction_mask(entropy_BT, valid_BT, entropy_fraction)
        phase = 1.0
    clipped_BT = rewards_BT.clamp(min=floor)
    n_valid = float(valid_BT.sum().clamp(min=1))
    metrics = {
        "reopold_phase": phase,
        "kept_fraction": float(keep_BT.sum()) / n_valid,
        "below_floor_fraction": float(((rewards_BT < floor).to(valid_BT.dtype) * valid_BT).sum()) / n_valid,
    }
    return clipped_BT * keep_BT, keep_BT, metrics
