"""Where a batch's completions come from: the student's own samples, teacher samples, reference solutions,
and the privileged view of a batch (the same completions behind the problem + reference solution).

``s`` is the run's ``Session`` (``opd.session``): task, tokenizer, samplers, device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..episodes import is_episodic, run_task_episodes, scripted_episodes, template_kwargs_with_tools
from ..objectives.common import Normaliser, step_normaliser
from ..prompts import PromptError, encode_completion, encode_prompt
from ..rollout import Rollouts, left_pad, rollouts_from_completions
from ..tasks.base import Example


@dataclass
class Batch:
    rollouts: Rollouts
    examples: list[Example]  # one per row
    on_policy: bool
    rewards: list[float] | None = None  # per-row rewards: the task's for student samples, OVD's for its group
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


def encode_prompts(s, examples: list[Example], privileged: bool = False) -> list[list[int]]:
    """Token ids of each example's prompt (the privileged one: problem + reference solution), naming any that fails."""
    messages = s.task.privileged_messages if privileged else s.task.messages
    episodic = is_episodic(s.task)
    encoded = []
    for e in examples:
        kwargs = s.cfg.task.chat_template_kwargs
        if episodic:  # an episode's prompt lists its environment's tools, as the sampled one did
            kwargs = template_kwargs_with_tools(kwargs, s.task.environment(e).tools())
        try:
            encoded.append(encode_prompt(s.tokenizer, messages(e), s.max_prompt_tokens, kwargs))
        except PromptError as err:
            where = e.meta.get("source") or repr(e.prompt[:40])
            raise PromptError(f"{where}: {err} (sampling.max_new_tokens={s.cfg.sampling.max_new_tokens})") from None
    return encoded


def student_samples(s, examples: list[Example], generator: torch.Generator) -> Batch:
    """``sampling.samples_per_prompt`` completions of each example by the student, graded by the task once."""
    k = s.cfg.sampling.samples_per_prompt
    rows = [e for e in examples for _ in range(k)]
    rollouts, rewards, info = sample_rows(s, s.sampler, rows, generator)
    rollouts.group_B = [i // k for i in range(len(rows))]  # rows of one prompt share a group
    rollouts.route_B = [e.meta.get("teacher") for e in rows]
    return Batch(rollouts, rows, on_policy=True, rewards=rewards, info=info)


def sample_rows(
    s, sampler, rows: list[Example], generator: torch.Generator, grade: bool = True,
) -> tuple[Rollouts, list[float] | None, dict[str, float]]:
    """``(rollouts, rewards, metrics)`` of ``sampler`` on ``rows``: one completion each, graded by the task (unless
    ``grade`` is false: rewards None); or, for a task whose examples are environments (multi-turn tools), one whole
    episode each, graded by its environment."""
    if is_episodic(s.task):
        context = s.max_prompt_tokens + s.cfg.sampling.max_new_tokens if s.max_prompt_tokens else None
        episodes = run_task_episodes(s.task, rows, sampler, s.tokenizer, s.cfg.sampling, generator, s.cfg.task.chat_template_kwargs, context)
        return episodes.rollouts.to(s.device), episodes.rewards, episodes.metrics()
    rollouts = sampler.sample(encode_prompts(s, rows), s.cfg.sampling, generator)
    return rollouts, [s.task.reward(text, e) for text, e in zip(rollouts.texts, rows)] if grade else None, {}


def teacher_samples(s, examples: list[Example], generator: torch.Generator) -> Batch:
    if s.teacher_sampler is None:
        raise RuntimeError("teacher samples were requested but no teacher is loaded")
    rollouts, _, info = sample_rows(s, s.teacher_sampler, list(examples), generator, grade=False)
    return Batch(rollouts, list(examples), on_policy=False, info=info)


def reference_solutions(s, examples: list[Example], privileged_B: list[bool] | None = None) -> Batch:
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
    rollouts = rollouts_from_completions(prompts, completions, s.tokenizer.pad_token_id)
    rollouts.texts = [e.solution for e in examples]
    return Batch(rollouts.to(s.device), list(examples), on_policy=False)


def scripted_solutions(s, examples: list[Example]) -> Batch:
    """Episodes whose assistant turns are each example's scripted ``turns`` (tool calls and the answer), the
    observations between them the environment's own: SFT on tool-use traces trains on the scripted tokens only."""
    missing = [e for e in examples if not e.meta.get("turns")]
    if missing:
        where = missing[0].meta.get("source", "an example")
        raise ValueError(f"{where}: no scripted 'turns' (a list of assistant turns), which this method trains on")
    context = s.max_prompt_tokens + s.cfg.sampling.max_new_tokens if s.max_prompt_tokens else None
    episodes = scripted_episodes(s.task, examples, [e.meta["turns"] for e in examples], s.tokenizer, s.cfg.task.chat_template_kwargs, context)
    return Batch(episodes.rollouts.to(s.device), list(examples), on_policy=False, rewards=episodes.rewards, info=episodes.metrics())


def offline_data(s, examples: list[Example], generator: torch.Generator, use_teacher: bool) -> Batch:
    """Off-policy completions: teacher samples, or the reference solutions."""
    return teacher_samples(s, examples, generator) if use_teacher else reference_solutions(s, examples)


def privileged_view(s, batch: Batch) -> Rollouts:
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
