"""OPSD: on-policy self-distillation with a privileged-context teacher (arXiv 2601.18734).

The teacher is the student itself (fixed initial, EMA or current weights) reading the problem
*and* its reference solution; both score the student's own completion:

    L = mean over valid tokens of JSD_β(P_T(·|x, y*, ŷ_<n) ‖ P_S(·|x, ŷ_<n))     (β = 0.5, full vocabulary)

or the sampled-token variant ``A_n = ℓ^T_n - ℓ^S_n`` in the shared surrogate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.sections import require
from ..objectives import reverse_kl_advantages
from ..teachers.model import EmaTeacher, ModelTeacher, initial_student
from .base import Method, Needs, Session, register
from .batch import Batch
from .data import privileged_view
from .gkd import validate_full_vocabulary_keys
from .losses import full_vocabulary_loss, sampled_token_loss


@dataclass
class OPSDConfig:
    """On-policy self-distillation with a privileged-context teacher (docs/methods.md#opsd)."""

    loss: Literal["jsd", "sampled"] = "jsd"  # full-vocabulary JSD_β, or the sampled-token advantage ℓ^T - ℓ^S
    beta: float = 0.5
    temperature: float | None = None  # logits divided by this before the loss; None = sampling.temperature
    top_k: int | None = None  # restrict both distributions to the teacher's top-K tokens (paper option: 50)
    top_k_tail: bool = False  # with top_k: keep the rest of the mass as one extra class instead of renormalising
    teacher_weights: Literal["fixed", "ema", "current"] = "fixed"
    ema_decay: float = 0.999
    chunk_size: int | None = None  # token rows per chunk of the fused loss; None = about 2^25 logits per chunk


@register
class OPSD(Method):
    name = "opsd"
    config_class = OPSDConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        validate_full_vocabulary_keys(c, "method.opsd")
        require(c.temperature is None or c.temperature > 0, "method.opsd.temperature", "must be > 0 or null")
        require(0 < c.ema_decay < 1, "method.opsd.ema_decay", f"must be in (0, 1), got {c.ema_decay}")
        require(
            c.teacher_weights != "ema" or cfg.train.sharding != "fsdp", "method.opsd.teacher_weights",
            "is 'ema', which train.sharding=fsdp does not support yet (the EMA copy would be a whole unsharded student "
            "on every rank); use fixed or current, or train.sharding=none",
        )
        require(
            c.temperature is not None or cfg.sampling.temperature > 0 or c.loss == "sampled",
            "method.opsd.temperature",
            "must be set when sampling.temperature=0 (the JSD divides both logit sets by it; greedy sampling has none)",
        )

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(self_teacher=True, privileged=True, solutions=True, full_vocabulary=cls.section(cfg).loss == "jsd")

    def make_teacher(self, student, autocast, device):
        c, packed = self.config, self.cfg.train.packing
        if c.teacher_weights == "fixed":
            return initial_student(self.cfg.student, student, autocast, device, packed)
        if c.teacher_weights == "ema":
            return EmaTeacher(student, c.ema_decay, autocast, packed)
        return ModelTeacher(student, autocast, freeze=False, packed=packed)

    def loss(self, s: Session, batch: Batch, step: int):
        c = self.config
        teacher_view = privileged_view(s, batch)
        if c.loss == "sampled":  # A_n = ℓ^T_n - ℓ^S_n, the reverse-KL advantage with c = 1
            return sampled_token_loss(s, batch, lambda lp, tlp, mask: (reverse_kl_advantages(lp, tlp, mask), mask, {}), teacher_view)
        temperature = c.temperature if c.temperature is not None else self.cfg.sampling.temperature
        return full_vocabulary_loss(s, batch, teacher_view, c.beta, temperature, c.chunk_size, c.top_k, c.top_k_tail)
