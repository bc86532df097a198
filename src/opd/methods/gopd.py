"""G-OPD / ExOPD: reward extrapolation with a reference model (arXiv 2602.12125).

    A_t = λ(ℓ^T_t - ℓ^ref_t) - (ℓ^S_t - ℓ^ref_t)       (``objectives.gopd.gopd_advantages``)

λ = 1 is OPD (π_ref drops out and is not computed); λ > 1 extrapolates (ExOPD). π_ref is the
student's initial weights or a checkpoint such as the teacher's base (reward correction). The
fixed point is ``π ∝ π_T^λ π_ref^(1-λ)`` over whole sequences with ``discount`` γ = 1, and that
mixture per state (per prefix) with γ = 0.
Accepts per-example teacher routes (multi-teacher merging).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.sections import require
from ..objectives import gopd_advantages
from .base import Method, Needs, Session, register
from .batch import Batch
from .losses import reference_token_logprobs, sampled_token_loss


@dataclass
class GOPDConfig:
    """G-OPD / ExOPD reward scaling with a reference model (docs/methods.md#g-opd-and-exopd)."""

    reward_scale: float = 1.25  # λ; 1 = OPD, > 1 = ExOPD
    reference: str | None = "student_init"  # the student's initial weights, or a HF checkpoint path
    discount: float = 0.0


@register
class GOPD(Method):
    name = "gopd"
    config_class = GOPDConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        require(c.reward_scale > 0, "method.gopd.reward_scale", f"must be > 0, got {c.reward_scale}")
        require(0 <= c.discount <= 1, "method.gopd.discount", f"must be in [0, 1], got {c.discount}")
        if c.reward_scale != 1.0:
            require(
                c.reference is not None,
                "method.gopd.reference",
                f"is required when method.gopd.reward_scale != 1 (got {c.reward_scale}): "
                "use student_init or a checkpoint sharing the student's tokenizer",
            )

    @classmethod
    def needs(cls, cfg) -> Needs:
        c = cls.section(cfg)
        reference = c.reference if c.reward_scale != 1.0 else None
        # a reference other than the student's own initial weights would be a model of the teacher's tokenizer
        return Needs(teacher=True, routable=True, reference=reference, reference_key="method.gopd.reference", spans=reference in (None, "student_init"))

    def loss(self, s: Session, batch: Batch, step: int):
        c = self.config
        ref_logp_BC = reference_token_logprobs(s, batch.rollouts) if s.reference is not None else None

        def advantages(lp, tlp, mask):
            ref = ref_logp_BC if ref_logp_BC is None or batch.spans is None else batch.spans.collapse(ref_logp_BC)  # per span
            return gopd_advantages(lp, tlp, ref, mask, c.reward_scale, c.discount), mask, {}

        return sampled_token_loss(s, batch, advantages)
