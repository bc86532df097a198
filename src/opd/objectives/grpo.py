"""GRPO baseline (Shao et al. 2024, arXiv 2402.03300), as docs/methods.md#grpo specifies it.

G samples per prompt, scalar reward r from a verifier, group-normalised advantage

    A_i = (r_i - mean_group(r)) / (std_group(r) + ε)       (the same for every token of sample i; sample std by default)

used in the PPO-clipped surrogate (ε_clip = 0.2), token-mean, with an optional KL penalty
to π_ref estimated per token by ``k3 = exp(ℓ^ref - ℓ^θ) - (ℓ^ref - ℓ^θ) - 1``.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards_B: torch.Tensor, group_ids_B: torch.Tensor, eps: float = 1e-6, scale: bool = True, unbiased: bool = True
) -> torch.Tensor:
    """``(r - mean_group) / (std_group + ε)``; ``scale=False`` only centres.

    The std is the sample std (``unbiased``, Bessel-corrected, as TRL's ``GRPOTrainer`` computes it with
    ``torch.std``) or the population std; a group of one has std 0 (and advantage 0).
    """
    rewards_B = rewards_B.to(torch.float64)
    advantages = torch.zeros_like(rewards_B)
    for group in group_ids_B.unique():
        members = group_ids_B == group
        r = rewards_B[members]
        centred = r - r.mean()
        std = r.std(unbiased=unbiased) if r.numel() > 1 else r.new_zeros(())
        advantages[members] = centred / (std + eps) if scale else centred
    return advantages.float()


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token non-negative KL(π_θ ‖ π_ref) estimate ``exp(Δ) - Δ - 1``, Δ = ℓ^ref - ℓ^θ (differentiable in ℓ^θ)."""
    delta = ref_logp_BT.detach() - logp_BT
    return torch.exp(delta) - delta - 1
