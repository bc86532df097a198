"""GRPO with a verifier reward (Shao et al. 2024, arXiv 2402.03300).

    A_i = (r_i - mean_group(r)) / (std_group(r) + ε)      for every token of sample i

in the (optionally PPO-clipped) surrogate, with an optional k3 KL penalty to the student's
initial weights (``objectives.grpo``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..objectives import group_advantages, k3_kl, masked_mean, policy_gradient_loss
from ..sections import require
from . import token_views
from .base import Method, Needs, register
from .losses import importance_weights, old_logprobs, reference_token_logprobs, student_token_logprobs


@dataclass
class GRPOConfig:
    """GRPO with a verifier reward (METHODS §8)."""

    kl_coef: float = 0.0  # > 0 adds a k3 KL penalty to the student's initial weights
    scale_by_std: bool = True
    std: Literal["sample", "population"] = "sample"  # the group's std: sample (Bessel-corrected, as TRL) or population


def group_policy_loss(s, batch, scale_by_std: bool, kl_coef: float = 0.0, std: str = "sample") -> tuple[torch.Tensor, dict]:
    """The group-normalised advantage of each row's reward in the shared surrogate (+ k3 KL to ``s.reference``)."""
    m, r = s.cfg.method, batch.rollouts
    mask_BC = r.loss_mask_BC.float()
    rewards_B = torch.tensor(batch.rewards, device=mask_BC.device)
    groups_B = torch.tensor(r.group_B, device=mask_BC.device)
    advantages_BC = group_advantages(rewards_B, groups_B, scale=scale_by_std, unbiased=std == "sample")[:, None].expand_as(mask_BC)
    logp_BC, _ = student_token_logprobs(s, r)
    old_logp_BC = old_logprobs(batch, logp_BC)
    normaliser = s.method.normaliser(batch)
    weights = importance_weights(s, r, old_logp_BC)
    loss, metrics = policy_gradient_loss(logp_BC, old_logp_BC, advantages_BC, mask_BC, m.clip_eps, normaliser, weights)
    token_views.record(r, advantages_BC, mask_BC, logp_BC=logp_BC)
    if s.reference is not None and kl_coef > 0:
        ref_logp_BC = reference_token_logprobs(s, r)
        kl = masked_mean(k3_kl(logp_BC, ref_logp_BC), mask_BC, normaliser)
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = float(kl.detach())
    return loss, metrics


@register
class GRPO(Method):
    name = "grpo"
    config_class = GRPOConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        require(c.kl_coef >= 0, "method.grpo.kl_coef", f"must be >= 0, got {c.kl_coef}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        kl = cls.section(cfg).kl_coef > 0
        return Needs(group=True, answers=True, reference="student_init" if kl else None, reference_key="method.grpo.kl_coef")

    def loss(self, s, batch, step):
        return group_policy_loss(s, batch, self.config.scale_by_std, self.config.kl_coef, self.config.std)
