"""SFT: cross-entropy on reference solutions or teacher samples (docs/methods.md#sft; sequence-level KD, arXiv 1606.07947).

    L = -mean over valid tokens of log π_θ(y_t | s_t)       (``objectives.sft.sft_loss``)

Optionally a fraction of the reference-solution examples sit behind their privileged prompt
(problem + reference solution), which teaches a model to use privileged context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.sections import require
from ..models.scoring import rollout_logprobs
from ..objectives import sft_loss
from .base import Method, Needs, Session, register
from .batch import Batch
from .data import offline_data, reference_solutions


@dataclass
class SFTConfig:
    """Cross-entropy on reference solutions or teacher samples (docs/methods.md#sft)."""

    source: Literal["reference", "teacher"] = "reference"
    # fraction of reference-solution examples shown behind their privileged prompt (the task's problem + reference
    # solution): teaches a model to use privileged context, so it can later be its own OPSD teacher
    privileged_fraction: float = 0.0


@register
class SFT(Method):
    name = "sft"
    config_class = SFTConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        require(0 <= c.privileged_fraction <= 1, "method.sft.privileged_fraction", f"must be in [0, 1], got {c.privileged_fraction}")
        require(
            c.privileged_fraction == 0 or c.source == "reference",
            "method.sft.privileged_fraction",
            "needs method.sft.source=reference (the privileged prompt holds the reference solution)",
        )

    @classmethod
    def needs(cls, cfg) -> Needs:
        c = cls.section(cfg)
        # privileged: part of the rows sit behind the privileged prompt, whose length the pre-flight pass checks
        return Needs(teacher=c.source == "teacher", solutions=c.source == "reference", privileged=c.privileged_fraction > 0)

    def data(self, s: Session, examples, rng, generator):
        c = self.config
        if c.privileged_fraction > 0:
            return reference_solutions(s, examples, [rng.random() < c.privileged_fraction for _ in examples])
        return offline_data(s, examples, generator, use_teacher=c.source == "teacher")

    def loss(self, s: Session, batch: Batch, step: int):
        r = batch.rollouts
        with s.autocast():
            logp_BC, _ = rollout_logprobs(s.student, r, packed=s.cfg.train.packing)
        return sft_loss(logp_BC, r.loss_mask_BC.float(), self.normaliser(batch)), {}
