"""Where a batch's completions come from besides the student's own samples (``base.student_samples``): teacher
samples, reference solutions (scripted episodes for a task of episodes), and the privileged view of a batch (the
same completions behind the problem + reference solution)."""

from __future__ import annotations

import torch

from ..episodes.environments import is_episodic
from ..episodes.scripted import scripted_episodes
from ..models.prompts import encode_completion
from ..models.rollouts import Rollouts, build_rollouts, left_pad
from ..tasks.base import Example
from .base import Session, encode_prompts, sample_rows
from .batch import Batch


def teacher_samples(s: Session, examples: list[Example], generator: torch.Generator) -> Batch:
    if s.teacher_sampler is None:
        raise RuntimeError("teacher samples were requested but no teacher is loaded")
    rollouts, _, info, _ = sample_rows(s, s.teacher_sampler, list(examples), generator, grade=False)
    return Batch(rollouts, list(examples), on_policy=False, info=info)


def reference_solutions(s: Session, examples: list[Example], privileged_B: list[bool] | None = None) -> Batch:
    """The examples' reference solutions as completions; rows flagged in ``privileged_B`` sit behind the privileged prompt.
    For a task of episodes, each example's scripted ``turns`` played as an episode (``scripted_episodes``)."""
    if is_episodic(s.task):
        return scripted_solutions(s, examples)
    missing = [e for e in examples if e.solution is None]
    if missing:
        where = missing[0].meta.get("source", "an example")
        raise ValueError(f"{where}: no reference solution, which this method trains on (set task.solution_field)")
    privileged_B = privileged_B or [False] * len(examples)
    kwargs = s.cfg.task.chat_template_kwargs
    completions = [encode_completion(s.tokenizer, s.task.messages(e), e.solution, kwargs) for e in examples]
    prompts = [encode_prompts(s, [e], privileged)[0] for e, privileged in zip(examples, privileged_B)]
    rollouts = build_rollouts(prompts, completions, s.tokenizer.pad_token_id, texts=[e.solution for e in examples], device=s.device)
    return Batch(rollouts, list(examples), on_policy=False)


def scripted_solutions(s: Session, examples: list[Example]) -> Batch:
    """Episodes whose assistant turns are each example's scripted ``turns`` (tool calls and the answer), the
    observations between them the environment's own: SFT on tool-use traces trains on the scripted tokens only."""
    missing = [e for e in examples if not e.meta.get("turns")]
    if missing:
        where = missing[0].meta.get("source", "an example")
        raise ValueError(f"{where}: no scripted 'turns' (a list of assistant turns), which this method trains on")
    episodes = scripted_episodes(s.task, examples, [e.meta["turns"] for e in examples], s.tokenizer, s.cfg.task.chat_template_kwargs, s.context)
    return Batch(episodes.rollouts.to(s.device), episodes.played(examples), on_policy=False, rewards=episodes.rewards, info=episodes.metrics())


def offline_data(s: Session, examples: list[Example], generator: torch.Generator, use_teacher: bool) -> Batch:
    """Off-policy completions: teacher samples, or the reference solutions."""
    return teacher_samples(s, examples, generator) if use_teacher else reference_solutions(s, examples)


def privileged_view(s: Session, batch: Batch) -> Rollouts:
    """The batch's completions behind each example's privileged prompt (problem + reference solution)."""
    ids_BP, mask_BP = left_pad(encode_prompts(s, batch.examples, privileged=True), s.tokenizer.pad_token_id)
    return batch.rollouts.with_prompts(ids_BP.to(s.device), mask_BP.to(s.device))


def batch_metrics(batch: Batch) -> dict[str, float]:
    """Completion length, tokens the student generated, and the reward (task accuracy) of its own samples."""
    r = batch.rollouts
    metrics = {"mean_length": float(r.completion_lengths_B.float().mean()), "student_tokens": 0.0}
    if batch.on_policy:
        metrics["student_tokens"] = float(r.loss_mask_BC.sum())  # an episode's observation tokens are not the student's
        graded = [reward for reward, e in zip(batch.rewards, batch.examples) if e.answer is not None]
        if graded:  # prompt-only rows have nothing to grade
            metrics["reward"] = sum(graded) / len(graded)
    metrics.update(batch.info)
    return metrics
