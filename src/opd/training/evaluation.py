"""Held-out evaluation: greedy accuracy, and avg@k / pass@k over k samples per prompt."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config.sections import SamplingConfig
from ..engines.base import Sampler, sampling_round, whole_for
from ..episodes.driver import run_task_episodes
from ..episodes.environments import is_episodic
from ..methods.base import Session
from ..models.prompts import PromptError, encode_prompt
from ..tasks.base import Example, Task
from ..tasks.reward_functions import grades_every_row


@dataclass
class EvalRow:
    """One held-out example's outcome: its greedy reward and length, and its ``k`` sampled rewards (if asked)."""

    graded: bool
    correct: float
    length: int
    sampled: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)  # per-episode measures (tool calls, F1), averaged by ``summarise``


def evaluate(sampler: Sampler, tokenizer, task: Task, examples: list[Example], sampling: SamplingConfig, k: int = 1, *options, **named) -> dict[str, float]:
    """``summarise`` of ``evaluate_rows`` (same arguments): ``accuracy`` (greedy), ``mean_length``; with ``k > 1``
    also ``avg@k`` and ``pass@k``."""
    return summarise(evaluate_rows(sampler, tokenizer, task, examples, sampling, k, *options, **named), k, grades_every_row(task))


def evaluate_rows(
    sampler: Sampler,
    tokenizer,
    task: Task,
    examples: list[Example],
    sampling: SamplingConfig,
    k: int = 1,
    temperature: float = 1.0,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    context: int | None = None,
    template_kwargs: dict | None = None,
) -> list[EvalRow]:
    """Each example's ``EvalRow``: its greedy reward and length, and with ``k > 1`` its ``k`` rewards sampled at
    ``temperature`` with ``generator``. Prompts are the task's messages encoded with ``tokenizer`` (no longer than
    the ``context`` leaves beside ``sampling.max_new_tokens``); a row without an answer (prompt-only data) is not
    graded; the task adds its own measures (``Task.eval_metrics``). Rows from several ranks concatenate, then
    ``summarise``. A task whose examples are environments is evaluated on whole episodes, graded by them."""
    if is_episodic(task):
        return episode_rows(sampler, tokenizer, task, examples, sampling, k, temperature, batch_size, generator, template_kwargs, context)
    max_prompt_tokens = context - sampling.max_new_tokens if context else None
    prompts = []
    for e in examples:
        try:
            prompts.append(encode_prompt(tokenizer, task.messages(e), max_prompt_tokens, template_kwargs))
        except PromptError as err:
            raise PromptError(f"evaluation example {e.meta.get('source') or repr(e.prompt[:40])}: {err}") from None
    greedy = replace(sampling, temperature=0.0)
    every_row = grades_every_row(task)  # the user's reward functions grade rows without an answer too
    rows = []
    for start in range(0, len(prompts), batch_size):
        rollouts = sampler.sample(prompts[start : start + batch_size], greedy)
        batch = examples[start : start + batch_size]
        rewards, _ = task.rewards(rollouts.texts, batch)
        for text, ex, length, reward in zip(rollouts.texts, batch, rollouts.completion_lengths_B.tolist(), rewards):
            rows.append(EvalRow(ex.answer is not None or every_row, reward, int(length), extra=task.eval_metrics(ex, text, reward)))
    if k > 1:
        sampled = replace(sampling, temperature=temperature)
        flat = [(i, prompts[i]) for i, row in enumerate(rows) if row.graded for _ in range(k)]
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            rollouts = sampler.sample([p for _, p in chunk], sampled, generator)
            rewards, _ = task.rewards(rollouts.texts, [examples[i] for i, _ in chunk])
            for (i, _), reward in zip(chunk, rewards):
                rows[i].sampled.append(reward)
    return rows


def episode_rows(sampler, tokenizer, task, examples, sampling, k, temperature, batch_size, generator, template_kwargs, context=None) -> list[EvalRow]:
    """``evaluate_rows`` on whole episodes: greedy, then ``k`` sampled ones per graded example."""
    greedy, sampled = replace(sampling, temperature=0.0), replace(sampling, temperature=temperature)
    rows = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        episodes = run_task_episodes(task, batch, sampler, tokenizer, greedy, None, template_kwargs, context)
        lengths = episodes.rollouts.completion_lengths_B.tolist()
        for i, (e, reward, n) in enumerate(zip(batch, episodes.rewards, lengths)):
            extra = {"episode_tool_calls": float(episodes.tool_calls[i]), **task.eval_metrics(e, final_reply(episodes.messages[i]), reward)}
            rows.append(EvalRow(e.answer is not None or grades_every_row(task), reward, int(n), extra=extra))
    if k > 1:
        flat = [i for i, row in enumerate(rows) if row.graded for _ in range(k)]
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            episodes = run_task_episodes(task, [examples[i] for i in chunk], sampler, tokenizer, sampled, generator, template_kwargs, context)
            for i, reward in zip(chunk, episodes.rewards):
                rows[i].sampled.append(reward)
    return rows


def final_reply(messages: list[dict]) -> str:
    """The last assistant turn of an episode's conversation ('' when there is none)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")


def summarise(rows: list[EvalRow], k: int = 1, user_rewards: bool = False) -> dict[str, float]:
    """``evaluate``'s metrics from the rows of every evaluated example: ``accuracy`` where every grade is 0 or 1, and
    ``reward`` (the mean) where one is not or the grades come from the user's reward functions (``user_rewards``)."""
    graded = [r for r in rows if r.graded]
    results = {"rows": len(rows), "graded": len(graded), "mean_length": sum(r.length for r in rows) / max(len(rows), 1)}
    for key in dict.fromkeys(key for r in rows for key in r.extra):
        values = [r.extra[key] for r in rows if key in r.extra]
        results[key] = sum(values) / len(values)
    if graded:
        mean = sum(r.correct for r in graded) / len(graded)
        if all(r.correct in (0.0, 1.0) for r in graded):
            results["accuracy"] = mean
        if user_rewards or "accuracy" not in results:
            results["reward"] = mean
    if k > 1 and graded:
        results[f"avg@{k}"] = sum(sum(r.sampled) / k for r in graded) / len(graded)
        results[f"pass@{k}"] = sum(float(max(r.sampled) >= 1.0) for r in graded) / len(graded)  # a sample with full credit
    return results


def evaluate_session(s: Session, sampler: Sampler, examples: list[Example], seed: int) -> dict[str, float]:
    """Held-out metrics of ``sampler`` (the student's, or the teacher's) on ``examples`` with the run's ``eval``
    settings; each rank evaluates a contiguous share of the examples and the rows are gathered."""
    e = s.cfg.eval
    sampling = s.cfg.sampling
    if e.max_new_tokens is not None:
        sampling = replace(sampling, max_new_tokens=e.max_new_tokens)
    ranks = s.ranks
    share = examples[ranks.rank * len(examples) // ranks.world_size : (ranks.rank + 1) * len(examples) // ranks.world_size]
    generator = torch.Generator(device=s.device).manual_seed(seed + 7919 * ranks.rank)

    def rows() -> list[EvalRow]:
        try:
            return evaluate_rows(
                sampler, s.tokenizer, s.task, share, sampling, e.k, e.temperature, e.batch_size, generator, s.context,
                s.cfg.task.chat_template_kwargs,
            )
        except PromptError as err:
            raise PromptError(f"{err} (evaluation generates up to {sampling.max_new_tokens} tokens: eval.max_new_tokens / sampling.max_new_tokens)") from None

    def rows_in_round() -> list[EvalRow]:
        with whole_for(sampler, s.student), sampling_round(sampler):  # ranks sharing an engine generate together
            return rows()

    return summarise(ranks.gather(rows_in_round), e.k, grades_every_row(s.task))
