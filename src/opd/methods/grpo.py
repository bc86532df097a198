"""GRPO with a verifier reward (Shao et al. 2024, arXiv 2402.03300).

    A_i = (r_i - mean_group(r)) / (std_group(r) + ε)      for every token of sample i

in the (optionally PPO-clipped) surrogate, with an optional k3 KL penalty to the student's
initial weights (``objectives.grpo``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.sections import require
from .base import Method, Needs, Session, register
from .batch import Batch
from .losses import group_policy_loss, reward_advantages


@dataclass
class GRPOConfig:
    """GRPO with a verifier reward (docs/methods.md#grpo)."""

    kl_coef: float = 0.0  # > 0 adds a k3 KL penalty to the student's initial weights
    scale_by_std: bool = True
    std: Literal["sample", "population"] = "sample"  # the group's std: sample (Bessel-corrected, as TRL) or population


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

    def row_advantages(self, batch: Batch):
        return reward_advantages(batch, self.config.scale_by_std, self.config.std)

    def loss(self, s: Session, batch: Batch, step: int):
        return group_policy_loss(s, batch, self.config.kl_coef)
