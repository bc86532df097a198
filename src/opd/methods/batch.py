"""A micro-batch as a method makes and trains it: its rollouts, the examples behind them, rewards, and what the loop
sets on it during a step (the step's normaliser, the micro-batch's own seed)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..models.rollouts import Rollouts, build_rollouts
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
    # per-row advantages that need the row's whole group (GRPO, OVD, OPD + task reward): Method.row_advantages of the
    # batch as sampled, set by the loop before its rows are regrouped into micro-batches
    advantages_B: torch.Tensor | None = None
    train_mask_BC: torch.Tensor | None = None  # the tokens the loss trains on, when a method narrows the loss mask
    normaliser: Normaliser | None = None  # the whole step's normaliser, set by the loop; None = this batch alone
    teacher_logp_BC: torch.Tensor | None = None  # teacher log-probs already computed for this batch (prepare_step)
    old_logp_BC: torch.Tensor | None = None  # the student's log-probs before this step's first update (several updates)
    prepared: bool = False  # Method.prepare_step has seen this batch (with the rest of its step)
    seed: int | None = None  # the micro-batch's own seed (run seed, step, micro-batch): dropout in its forward passes
    row_notes: list[str] | None = None  # per row, where its tokens came from (OVD: accepted / replaced), for opd inspect
    padding_pass: bool = False  # an empty pass (no trained token) so that every sharded rank runs as many as the others
    # a teacher with its own tokenizer: this batch's spans (teachers.cross_tokenizer.SpanScores), set by the loss that
    # scored it, so that a method can sum its own per-token terms (G-OPD's reference) over the same spans
    spans: object | None = None

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


# ----------------------------------------------------------------------------- rows, for regrouping a step's batches


@dataclass
class Row:
    """One row of a batch as plain values (what a batch is regrouped from, and what ranks exchange): its tokens,
    which of them are trained, the sampler's log-probs, and what the batch knew of it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    trained: list[int]  # 1 on the completion tokens the loss trains on
    sampler_logps: list[float] | None
    text: str
    group: int  # unique over the step: the rows of one prompt's group share it
    route: str | None
    example: Example
    on_policy: bool
    reward: float | None = None
    baseline_reward: float | None = None
    advantage: float | None = None  # the group-normalised advantage, computed on the batch as sampled
    note: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def batch_rows(batch: Batch, group_offset: int = 0) -> list[Row]:
    """``batch``'s rows as ``Row``s, their group ids shifted by ``group_offset`` (to keep them apart from other
    batches'). Only a batch as its data source made it: nothing a step sets later (masks, teacher log-probs)."""
    if batch.train_mask_BC is not None or batch.teacher_logp_BC is not None or batch.old_logp_BC is not None:
        raise ValueError("only a batch as sampled is split into rows (before prepare_step and the log-probs of a step)")
    r = batch.rollouts
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(r.prompt_ids_BP.cpu(), r.prompt_mask_BP.cpu())]
    lengths = r.completion_lengths_B.tolist()
    completion_ids, trained = r.completion_ids_BC.cpu().tolist(), r.loss_mask_BC.cpu().tolist()
    logps = r.sampler_logp_BC.cpu().tolist() if r.sampler_logp_BC is not None else None
    pick = lambda values, i: values[i] if values is not None else None  # noqa: E731
    advantages = batch.advantages_B.tolist() if batch.advantages_B is not None else None
    return [
        Row(
            prompts[i], completion_ids[i][:n], trained[i][:n], logps[i][:n] if logps is not None else None,
            r.texts[i] if r.texts else "", group_offset + (r.group_B[i] if r.group_B else i), r.route_B[i] if r.route_B else None,
            batch.examples[i], batch.on_policy, pick(batch.rewards, i), pick(batch.baseline_rewards, i), pick(advantages, i),
            pick(batch.row_notes, i),
        )
        for i, n in enumerate(lengths)
    ]


def rows_batch(rows: list[Row], pad_id: int, device: torch.device | str) -> Batch:
    """One batch of ``rows`` (all on- or all off-policy, all with or all without sampler log-probs), padded to its
    own longest prompt and completion."""
    if len({row.on_policy for row in rows}) != 1 or len({row.sampler_logps is None for row in rows}) != 1:
        raise ValueError("a batch's rows are all on- or all off-policy, and all have or all lack sampler log-probs")
    logps = None if rows[0].sampler_logps is None else [row.sampler_logps for row in rows]
    rollouts = build_rollouts(
        [row.prompt_ids for row in rows], [row.completion_ids for row in rows], pad_id, trained=[row.trained for row in rows],
        logps=logps, texts=[row.text for row in rows], device=device,
    )
    rollouts.group_B = [row.group for row in rows]
    rollouts.route_B = [row.route for row in rows]
    column = lambda name: None if getattr(rows[0], name) is None else [getattr(row, name) for row in rows]  # noqa: E731
    advantages = column("advantage")
    return Batch(
        rollouts, [row.example for row in rows], rows[0].on_policy, rewards=column("reward"), baseline_rewards=column("baseline_reward"),
        advantages_B=torch.tensor(advantages, dtype=torch.float32, device=device) if advantages is not None else None,
        row_notes=column("note"),
    )


def row_kind(row: Row) -> tuple[bool, bool]:
    """Rows of one kind may share a micro-batch: on- or off-policy, with or without sampler log-probs."""
    return row.on_policy, row.sampler_logps is not None
