"""REOPOLD: relaxed on-policy distillation (arXiv 2603.11137).

Token reward ``R_t = sg(ℓ^T_t - ℓ^S_t)`` with a mixture-based floor, entropy-selected tokens and an
exploration → refinement switch (``objectives.reopold.reopold_rewards_and_mask``):

    J = (1/Σ M) Σ_t ρ_t · R̂_t · M_t,    R̂_t = max(R_t, log(λ)/(1-λ))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config.sections import require
from ..objectives import reopold_rewards_and_mask, reward_floor
from .base import Method, Needs, Session, register
from .batch import Batch
from .losses import sampled_token_loss, student_token_logprobs, teacher_span_scores, teacher_token_logprobs


@dataclass
class ReopoldConfig:
    """REOPOLD relaxed OPD (docs/methods.md#reopold)."""

    mixture_lambda: float = 0.2
    floor_form: Literal["log_lambda_over_one_minus_lambda", "log_of_lambda_ratio"] = "log_lambda_over_one_minus_lambda"
    entropy_fraction: float = 0.2
    switch_step: int | None = None  # None = half of train.steps


PREPARE_SALT = 1_000_001  # the entropy pass's dropout seed, apart from the loss passes' (Batch.rng)


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
        return Needs(teacher=True, routable=True, spans=True)

    def prepare_step(self, s: Session, batches: list[Batch], step: int):
        """Choose the trained tokens over the whole step (all micro-batches, every rank's): the exploration mask,
        or the top-β entropy tokens of the step's valid tokens. Teacher log-probs are kept for the loss; the
        student's entropy costs one extra forward pass without gradient per micro-batch. Returns the selection's
        statistics."""
        c = self.config
        switch = c.switch_step if c.switch_step is not None else self.cfg.train.steps // 2
        student, teacher, entropy, mask = [], [], [], []
        for batch in batches:
            r = batch.rollouts
            spans = batch.spans = teacher_span_scores(s, batch) if s.teacher.reads_text else None
            batch.teacher_logp_BC = teacher_token_logprobs(s, r) if spans is None else spans.teacher_logp_BC
            with torch.no_grad(), batch.rng(PREPARE_SALT):  # entropy at the training (sampling) temperature
                logp_BC, entropy_BC = student_token_logprobs(s, r, with_entropy=True)
            mask_BC = r.loss_mask_BC.float()
            if spans is not None:  # a teacher with its own tokenizer: spans are chosen, by their most uncertain token
                logp_BC, entropy_BC, mask_BC = spans.collapse(logp_BC), spans.span_max(entropy_BC), spans.span_mask(mask_BC)
            student.append(logp_BC), teacher.append(batch.teacher_logp_BC), entropy.append(entropy_BC), mask.append(mask_BC)
        width = max((m.shape[1] for m in mask), default=0)  # a rank the token budget gave no micro-batch sends no rows
        stacked = [
            torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ts]) if ts else torch.zeros(0, 0, device=s.device)
            for ts in (student, teacher, entropy, mask)
        ]
        gathered, starts = zip(*(s.ranks.gather_rows(t) for t in stacked))  # every rank's rows: one selection for the step
        start = starts[0]
        _, keep_BC, metrics = reopold_rewards_and_mask(*gathered, step, switch, c.mixture_lambda, c.entropy_fraction, c.floor_form)
        for batch, m in zip(batches, mask):
            batch.train_mask_BC = keep_BC[start : start + m.shape[0], : m.shape[1]].contiguous()
            if batch.spans is not None:  # every student token of a chosen span
                batch.train_mask_BC = batch.spans.spread(batch.train_mask_BC) * batch.rollouts.loss_mask_BC.to(batch.train_mask_BC.dtype)
            start += m.shape[0]
        return metrics

    def loss(self, s: Session, batch: Batch, step: int):
        c = self.config
        floor = reward_floor(c.mixture_lambda, c.floor_form)
        if batch.train_mask_BC is None:  # called outside a training step: select within this batch
            self.prepare_step(s, [batch], step)

        def advantages(lp, tlp, mask):  # R̂ = max(ℓ^T - ℓ^S, floor) on the tokens prepare_step chose
            return (tlp - lp).clamp(min=floor) * batch.train_mask_BC, batch.train_mask_BC, {}

        return sampled_token_loss(s, batch, advantages)
