"""Reverse-KL on-policy distillation, "OPD" (Thinking Machines, Oct 2025; the reverse-KL member of GKD, arXiv 2306.13649).

    A_t = -c · (ℓ^S_t - ℓ^T_t)        on the student's own samples, optionally discounted by γ

(``objectives.opd.reverse_kl_advantages``), in the shared policy-gradient surrogate.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.sections import require
from ..objectives import reverse_kl_advantages
from .base import Method, Needs, Session, register
from .batch import Batch
from .losses import sampled_token_loss


@dataclass
class OPDConfig:
    """Reverse-KL OPD (docs/methods.md#opd)."""

    coef: float = 1.0
    discount: float = 0.0  # γ: 0 = per-token advantage, 1 = full return


@register
class OPD(Method):
    name = "opd"
    config_class = OPDConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        require(0 <= c.discount <= 1, "method.opd.discount", f"must be in [0, 1], got {c.discount}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(teacher=True, routable=True, spans=True)

    def loss(self, s: Session, batch: Batch, step: int):
        c = self.config
        return sampled_token_loss(
            s, batch, lambda lp, tlp, mask: (reverse_kl_advantages(lp, tlp, mask, c.coef, c.discount), mask, {})
        )
