"""GRPO baseline (Shao et al. 2024, arXiv 2402.03300), as docs/methods.md#grpo specifies it.

G samples per prompt, scalar reward r from a verifier, group-normalised advantage

    A_i = (r_i - mean_group(r)) / (std_group(r) + ε)       (the same for every token of sample i; sample std by default)

used in the PPO-clipped surrogate (ε_clip = 0.2), token-mean, with an optional KL penalty
to π_ref estimated per token by ``k3 = exp(ℓ^ref - ℓ^θ) - (ℓ^ref - ℓ^θ) - 1``.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards_B: torch.Tensor, group_ids_B: torch.Tensor, eps: float = 1e-6, scale: bool = True, unbiased: bool = True,
    baseline_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(r - b) / (σ + ε)``, ``b`` and ``σ`` the mean and std over the row's group of ``baseline_B`` — by default the
    rewards themselves (GRPO's ``(r - mean_group) / (std_group + ε)``); with ``scale=False``, or a std of 0, only
    ``r - b``.

    The std is the sample std (``unbiased``, Bessel-corrected, as TRL's ``GRPOTrainer`` computes it with
    ``torch.std``) or the population std; a group of one has std 0 (and, its own baseline, advantage 0). A std of 0
    with the rewards as their own baseline means every ``r - b`` is exactly 0, so GRPO's advantages are unchanged by
    not dividing; with another baseline (OVD's: the student's own rewards, ``objectives.ovd``) ``r - b`` is kept.
    """
    rewards_B = rewards_B.to(torch.float64)
    baseline_B = rewards_B if baseline_B is None else baseline_B.to(torch.float64)
    advantages = torch.zeros_like(rewards_B)
    for group in group_ids_B.unique():
        members = group_ids_B == group
        b = baseline_B[members]
        centred = rewards_B[members] - b.mean()
        std = b.std(unbiased=unbiased) if b.numel() > 1 else b.new_zeros(())
        advantages[members] = centred / (std + eps) if scale and std > 0 else centred
    return advantages.float()


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token non-negative KL(π_θ ‖ π_ref) estimate ``exp(Δ) - Δ - 1``, Δ = ℓ^ref - ℓ^θ (differentiable in ℓ^θ)."""
    delta = ref_logp_BT.detach() - logp_BT
    return torch.exp(delta) - delta - 1
