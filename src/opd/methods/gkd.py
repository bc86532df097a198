"""GKD: generalised-JSD distillation over the full vocabulary (Agarwal et al. 2024, arXiv 2306.13649).

    L = Σ_{i,t} w_{i,t} · D_β(P_T(·|s_{i,t}) ‖ P_S(·|s_{i,t})),   both logit sets divided by τ

on the student's samples with probability λ_onpolicy, else on reference solutions (or teacher
samples, ``seq_kd``). β = 0 forward KL, β = 1 reverse KL; fused chunked loss (``objectives.gkd``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.sections import require
from .base import Method, Needs, Session, register, student_samples
from .batch import Batch
from .data import offline_data
from .losses import cross_vocabulary_loss, full_vocabulary_loss


@dataclass
class GKDConfig:
    """Generalised JSD over the full vocabulary (docs/methods.md#gkd)."""

    beta: float = 0.5
    temperature: float = 0.9
    lambda_onpolicy: float = 0.5
    seq_kd: bool = False  # off-policy batches use teacher samples instead of reference solutions
    top_k: int | None = None  # restrict both distributions to the teacher's top-K tokens
    top_k_tail: bool = False  # with top_k: keep the rest of the mass as one extra class instead of renormalising
    chunk_size: int | None = None  # token rows per chunk of the fused loss; None = about 2^25 logits per chunk
    # teacher.tokenizer=own (docs/methods.md, "A teacher with another tokenizer"): projection maps the teacher's
    # distribution onto the student's vocabulary at every student token; hybrid is GOLD's (D_β on the tokens both
    # vocabularies write, ULD's sorted distance on the rest, at spans of one token on each side), with its weights
    cross_vocab: str = "projection"
    hybrid_matched_weight: float = 1.0
    hybrid_unmatched_weight: float = 1.0


def validate_full_vocabulary_keys(c, prefix: str) -> None:
    """The keys GKD and OPSD share: β, chunk size, teacher top-k and its tail bucket."""
    require(0 <= c.beta <= 1, f"{prefix}.beta", f"must be in [0, 1], got {c.beta}")
    require(c.chunk_size is None or c.chunk_size >= 1, f"{prefix}.chunk_size", f"must be >= 1 or null, got {c.chunk_size}")
    require(c.top_k is None or c.top_k >= 1, f"{prefix}.top_k", f"must be >= 1 or null, got {c.top_k}")
    require(not c.top_k_tail or c.top_k is not None, f"{prefix}.top_k_tail", f"needs {prefix}.top_k")


@register
class GKD(Method):
    name = "gkd"
    config_class = GKDConfig

    @classmethod
    def validate(cls, cfg) -> None:
        c = cls.section(cfg)
        validate_full_vocabulary_keys(c, "method.gkd")
        require(c.temperature > 0, "method.gkd.temperature", f"must be > 0, got {c.temperature}")
        require(0 <= c.lambda_onpolicy <= 1, "method.gkd.lambda_onpolicy", f"must be in [0, 1], got {c.lambda_onpolicy}")
        require(c.cross_vocab in ("projection", "hybrid"), "method.gkd.cross_vocab", f"must be projection or hybrid, got {c.cross_vocab!r}")
        for key in ("hybrid_matched_weight", "hybrid_unmatched_weight"):
            require(getattr(c, key) >= 0, f"method.gkd.{key}", f"must be >= 0, got {getattr(c, key)}")
        if cfg.teacher.tokenizer == "own":
            require(c.top_k is None, "method.gkd.top_k", "must be null with teacher.tokenizer=own (the hybrid divergence reads "
                    "both full vocabularies)")
            require(not c.seq_kd, "method.gkd.seq_kd", "must be false with teacher.tokenizer=own (the teacher does not sample "
                    "in the student's tokens)")

    @classmethod
    def needs(cls, cfg) -> Needs:
        c = cls.section(cfg)
        return Needs(teacher=True, full_vocabulary=True, solutions=c.lambda_onpolicy < 1 and not c.seq_kd, spans=True)

    @classmethod
    def loss_temperature(cls, cfg) -> tuple[str, float]:
        return "method.gkd.temperature", cls.section(cfg).temperature

    def data(self, s: Session, examples, rng, generator):
        c = self.config
        if rng.random() < c.lambda_onpolicy:
            return student_samples(s, examples, generator)
        return offline_data(s, examples, generator, use_teacher=c.seq_kd)

    def loss(self, s: Session, batch: Batch, step: int):
        c = self.config
        if s.teacher.reads_text:
            return cross_vocabulary_loss(s, batch, c.beta, c.temperature, c.chunk_size, c.cross_vocab, c.hybrid_matched_weight,
                                         c.hybrid_unmatched_weight)
        return full_vocabulary_loss(s, batch, batch.rollouts, c.beta, c.temperature, c.chunk_size, c.top_k, c.top_k_tail)
