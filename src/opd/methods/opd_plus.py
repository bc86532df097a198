"""OPD+: unbiased sampled-token advantages for any f-divergence (arXiv 2606.01039).

With ``u_t = π_T(y_t|s_t) / π_θ(y_t|s_t)``: standard OPD uses ``A = -f(u)`` (biased unless
f = -log); OPD+ uses ``A = -f(u) + u·f'(u)`` (``objectives.opd_plus.f_divergence_advantages``),
for reverse KL, forward KL, JSD, squared Hellinger and total variation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.sections import require
from ..objectives import f_divergence_advantages
from .base import Method, Needs, Session, register
from .batch import Batch
from .losses import sampled_token_loss


@dataclass
class OPDPlusConfig:
    """Sampled-token f-divergence distillation, standard or unbiased (docs/methods.md#opd-f-divergences)."""

    divergence: Literal["reverse_kl", "forward_kl", "jsd", "hellinger", "tv"] = "jsd"
    unbiased: bool = True  # false = standard OPD advantage -f(u) (biased unless reverse KL)
    discount: float = 0.0  # γ on the f terms: 0 per-token, 1 full return
    log_ratio_clip: float | None = 6.0


@register
class OPDPlus(Method):
    name = "opd_plus"
    config_class = OPDPlusConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        require(0 <= c.discount <= 1, "method.opd_plus.discount", f"must be in [0, 1], got {c.discount}")
        require(
            c.log_ratio_clip is None or c.log_ratio_clip > 0,
            "method.opd_plus.log_ratio_clip",
            f"must be > 0 or null, got {c.log_ratio_clip}",
        )

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(teacher=True, routable=True, spans=True)

    @classmethod
    def default_reduction(cls, cfg) -> str:
        """The unbiased estimator needs a normaliser that does not depend on the sampled lengths."""
        return "constant" if cls.section(cfg).unbiased else "token_mean"

    def loss(self, s: Session, batch: Batch, step: int):
        c = self.config

        def advantages(lp, tlp, mask):
            adv, metrics = f_divergence_advantages(lp, tlp, mask, c.divergence, c.unbiased, c.discount, c.log_ratio_clip)
            return adv, mask, metrics

        return sampled_token_loss(s, batch, advantages)
