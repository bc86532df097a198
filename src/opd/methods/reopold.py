"""REOPOLD: relaxed on-policy distillation (arXiv 2603.11137).

Token reward ``R_t = sg(ℓ^T_t - ℓ^S_t)`` with a mixture-based floor, entropy-selected tokens and an
exploration → refinement switch (``objectives.reopold.reopold_rewards_and_mask``):

    J = (1/Σ M) Σ_t ρ_t · R̂_t · M_t,    R̂_t = max(R_t, log(λ)/(1-λ))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..objectives import reopold_rewards_and_mask
from ..sections import require
from .base import Method, Needs, register
from .losses import sampled_token_loss


@dataclass
class ReopoldConfig:
    """REOPOLD relaxed OPD (METHODS §6)."""

    mixture_lambda: float = 0.2
    floor_form: Literal["log_lambda_over_one_minus_lambda", "log_of_lambda_ratio"] = "log_lambda_over_one_minus_lambda"
    entropy_fraction: float = 0.2
    switch_step: int | None = None  # None = half of train.steps


@register
class Reopold(Method):
    name = "reopold"
    config_class = ReopoldConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        require(0 < c.mixture_lambda < 1, "method.reopold.mixture_lambda", f"must be in (0, 1), got {c.mixture_lambda}")
        require(0 < c.entropy_fraction <= 1, "method.reopold.entropy_fraction", f"must be in (0, 1], got {c.entropy_fraction}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(teacher=True, routable=True)

    def loss(self, s, batch, step):
        c = self.config
        switch = c.switch_step if c.switch_step is not None else self.cfg.train.steps // 2

        def advantages(lp, tlp, ent, mask):
            return reopold_rewards_and_mask(lp, tlp, ent, mask, step, switch, c.mixture_lambda, c.entropy_fraction, c.floor_form)

        return sampled_token_loss(s, batch, advantages, with_entropy=True)
