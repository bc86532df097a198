"""A micro-batch as a method makes and trains it: its rollouts, the examples behind them, rewards, and what the loop
sets on it during a step (the step's normaliser, the micro-batch's own seed)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..models.rollouts import Rollouts
from ..objectives.common import Normaliser, step_normaliser
from ..tasks.base import Example


@dataclass
class Batch:
    rollouts: Rollouts
    examples: list[Example]  # one per row
    on_policy: bool
    rewards: list[float] | None = None  # per-row rewards: the task's for student samples, OVD's for its group
    # OVD: each row's reward as the student sampled it, before any replacement (the group baseline's rewards)
    baseline_rewards: list[float] | None = None
    info: dict[str, float] = field(default_factory=dict)  # data-source metrics (OVD acceptance, …)
    train_mask_BC: torch.Tensor | None = None  # the tokens the loss trains on, when a method narrows the loss mask
    normaliser: Normaliser | None = None  # the whole step's normaliser, set by the loop; None = this batch alone
    teacher_logp_BC: torch.Tensor | None = None  # teacher log-probs already computed for this batch (prepare_step)
    old_logp_BC: torch.Tensor | None = None  # the student's log-probs before this step's first update (several updates)
    prepared: bool = False  # Method.prepare_step has seen this batch (with the rest of its step)
    seed: int | None = None  # the micro-batch's own seed (run seed, step, micro-batch): dropout in its forward passes
    row_notes: list[str] | None = None  # per row, where its tokens came from (OVD: accepted / replaced), for opd inspect

    @contextlib.contextmanager
    def rng(self, salt: int) -> Iterator[None]:
        """Torch's global RNG (what dropout draws from) seeded by this micro-batch's seed and ``salt`` (one per
        forward pass: the loss of each update, the log-probs before the first), and restored afterwards. So a
        micro-batch's dropout masks are the same whichever rank or position in the step it has, and a resumed
        run draws the ones an uninterrupted run would. Without a seed (outside a training step): unchanged."""
        if self.seed is None:
            yield
            return
        device = self.rollouts.completion_ids_BC.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed((self.seed * 1_000_003 + salt) % (2**63))
            yield

    @property
    def trained_mask_BC(self) -> torch.Tensor:
        return self.train_mask_BC if self.train_mask_BC is not None else self.rollouts.loss_mask_BC

    def normaliser_for(self, reduction: str, tokens_per_row: int | None) -> Normaliser:
        """The step's normaliser, or — outside a training step — one over this batch alone."""
        return self.normaliser or step_normaliser([self.trained_mask_BC], reduction, tokens_per_row)
