"""The shared update rule most methods reduce to (docs/methods.md#the-shared-update-rule).

    loss = -(1/N) Σ_{i,t} m_{i,t} · ρ_{i,t} · A_{i,t},   ρ = exp(ℓ^θ - sg(ℓ^old))

with optional PPO clipping ``-min(ρA, clip(ρ, 1-ε, 1+ε)A)``, an optional truncated
importance weight ``sg(min(exp(ℓ^trainer - ℓ^sampler), C))`` and an optional discount
``A_t ← Σ_{u≥t} γ^{u-t} A_u``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

Reduction = Literal["token_mean", "seq_mean_token_mean", "constant"]


@dataclass(frozen=True)
class Normaliser:
    """How the per-token loss terms of one optimizer step are weighted: ``w = m / denominator``
    (``seq_mean_token_mean``: ``m / |row| / denominator``), with the denominator taken over the
    *whole* step — every micro-batch (and, with several processes, every rank) — so that
    accumulating micro-batches gives the gradient of the one big batch.

    - ``token_mean``: the step's number of valid tokens. Biased as a gradient estimator when
      lengths vary: it depends on the sampled lengths.
    - ``seq_mean_token_mean``: the step's number of rows with a valid token, each row first
      divided by its own length (also length-dependent).
    - ``constant``: rows × ``tokens_per_row`` (default ``sampling.max_new_tokens``; the "Dr. GRPO"
      choice): a constant, so the surrogate's expected gradient is the exact gradient of the
      objective divided by that constant.
    """

    reduction: Reduction
    denominator: float

    def weights(self, mask_BT: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        mask_BT = mask_BT.to(dtype)
        if self.reduction == "seq_mean_token_mean":
            mask_BT = mask_BT / mask_BT.sum(-1, keepdim=True).clamp(min=1)
        return mask_BT / self.denominator


def step_normaliser(
    masks_BT: list[torch.Tensor], reduction: Reduction, tokens_per_row: int | None = None, total: Callable[[float], float] = float,
) -> Normaliser:
    """The ``Normaliser`` of a step made of these micro-batches' loss masks; ``total`` adds the count of the step's
    micro-batches held elsewhere (summed over the ranks of a several-process run; the identity in one process)."""
    if reduction == "token_mean":
        denominator = sum(float(m.sum()) for m in masks_BT)
    elif reduction == "seq_mean_token_mean":
        denominator = sum(float((m.sum(-1) > 0).sum()) for m in masks_BT)
    elif reduction == "constant":
        if not tokens_per_row:
            raise ValueError("the constant normaliser needs tokens_per_row (e.g. sampling.max_new_tokens)")
        denominator = sum(m.shape[0] for m in masks_BT) * float(tokens_per_row)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return Normaliser(reduction, max(total(denominator), 1.0))


def reduction_weights(mask_BT: torch.Tensor, reduction: Reduction | Normaliser = "token_mean", dtype=torch.float32) -> torch.Tensor:
    """Per-token weights ``w`` with ``masked_mean(v, mask, reduction) = Σ w·v``.

    A ``Normaliser`` carries its step-wide denominator; a reduction name normalises over this
    batch alone (``token_mean``: ``m/Σm``; ``seq_mean_token_mean``: ``m_{b,t} / (|b| · #sequences with
    a token)``). An all-masked batch gives all-zero weights, so it changes nothing (never NaN).
    """
    if not isinstance(reduction, Normaliser):
        reduction = step_normaliser([mask_BT], reduction)
    return reduction.weights(mask_BT, dtype)


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor, reduction: Reduction | Normaliser = "token_mean") -> torch.Tensor:
    """Token-mean over all valid tokens, or the mean over sequences of each sequence's token-mean.

    Masked positions are selected out, not multiplied by zero, so an ±inf or NaN there changes
    nothing; an all-masked batch gives 0 (not NaN), so a batch with no trainable token changes nothing.
    """
    weights_BT = reduction_weights(mask_BT, reduction, values_BT.dtype)
    return torch.where(weights_BT != 0, values_BT, torch.zeros_like(values_BT)).mul(weights_BT).sum()


def discounted_cumsum(values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_t = Σ_{u≥t} γ^{u-t} m_u v_u`` along each row (γ = 0 returns ``m·v``); masked values are selected out."""
    values_BT = torch.where(mask_BT.bool(), values_BT, torch.zeros_like(values_BT))
    if gamma == 0:
        return values_BT
    out_BT = torch.zeros_like(values_BT)
    running_B = torch.zeros_like(values_BT[:, 0])
    for t in range(values_BT.shape[1] - 1, -1, -1):
        running_B = values_BT[:, t] + gamma * running_B
        out_BT[:, t] = running_B
    return out_BT * mask_BT


def truncated_importance_weights(trainer_logp_BT, sampler_logp_BT, cap: float) -> torch.Tensor:
    """``sg(min(exp(ℓ^trainer - ℓ^sampler), C))``: corrects a sampler that differs numerically from the trainer."""
    return torch.exp(trainer_logp_BT.detach() - sampler_logp_BT).clamp(max=cap)


def policy_gradient_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float | None = None,
    reduction: Reduction | Normaliser = "token_mean",
    weights_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The surrogate ``-mean(m · ρ · A)``, ``ρ = exp(ℓ^θ - sg(ℓ^old))``; advantages are treated as constants.

    ``∇loss = -mean(m · ρ · A · ∇ℓ^θ)``: on-policy (ρ = 1) the REINFORCE gradient. Masked positions
    are selected out before any product, so non-finite values there give neither a NaN loss nor a NaN
    gradient; a non-finite advantage on a valid token (e.g. a teacher log-prob of -inf under a reverse
    KL, which is then truly infinite) gives a non-finite loss, which the loop skips and counts.
    """
    valid_BT = mask_BT.bool()
    advantages_BT = torch.where(valid_BT, advantages_BT.detach(), torch.zeros_like(advantages_BT))  # no 0·inf at masked positions
    ratio_BT = torch.exp(torch.where(valid_BT, logp_BT - old_logp_BT.detach(), torch.zeros_like(logp_BT)))
    objective_BT = ratio_BT * advantages_BT
    metrics = {}
    if clip_eps is not None:
        clipped_BT = ratio_BT.clamp(1 - clip_eps, 1 + clip_eps) * advantages_BT
        objective_BT = torch.minimum(objective_BT, clipped_BT)
        was_clipped = ((ratio_BT - 1).abs() > clip_eps) & mask_BT.bool()
        metrics["clip_fraction"] = float(was_clipped.sum() / mask_BT.sum().clamp(min=1))
    if weights_BT is not None:
        objective_BT = objective_BT * torch.where(valid_BT, weights_BT.detach(), torch.zeros_like(weights_BT))
    loss = -masked_mean(objective_BT, mask_BT, reduction)
    return loss, metrics
