"""Held-out evaluation: greedy accuracy, and avg@k / pass@k over k samples per prompt."""

from __future__ import annotations

from dataclasses import replace

import torch

from .prompts import PromptError, encode_prompt
from .rollout import Sampler
from .sections import SamplingConfig
from .tasks.base import Example, Task


def evaluate(
    sampler: Sampler,
    tokenizer,
    task: Task,
    examples: list[Example],
    sampling: SamplingConfig,
    k: int = 1,
    temperature: float = 1.0,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    max_prompt_tokens: int | None = None,
    template_kwargs: dict | None = None,
) -> dict[str, float]:
    """``accuracy`` (greedy), ``mean_length``; with ``k > 1`` also ``avg@k`` and ``pass@k`` at ``temperature``,
    sampled with ``generator``. Prompts are the task's messages encoded with ``tokenizer``.

    Accuracies are over the rows that have an answer (``graded`` of ``rows``); with none (prompt-only data) there
    is no accuracy, only the lengths."""
    prompts = []
    for e in examples:
        try:
            prompts.append(encode_prompt(tokenizer, task.messages(e), max_prompt_tokens, template_kwargs))
        except PromptError as err:
            raise PromptError(f"evaluation example {e.meta.get('source') or repr(e.prompt[:40])}: {err}") from None
    greedy = replace(sampling, temperature=0.0)
    correct, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        rollouts = sampler.sample(prompts[start : start + batch_size], greedy)
        batch = examples[start : start + batch_size]
        correct += [task.reward(text, ex) for text, ex in zip(rollouts.texts, batch)]
        lengths += rollouts.completion_lengths_B.tolist()
    graded = [i for i, e in enumerate(examples) if e.answer is not None]
    results = {"rows": len(examples), "graded": len(graded), "mean_length": sum(lengths) / len(lengths)}
    if graded:
        results["accuracy"] = sum(correct[i] for i in graded) / len(graded)
    if k > 1 and graded:
        sampled = replace(sampling, temperature=temperature)
        per_prompt = [[] for _ in examples]
        flat = [(i, prompts[i]) for i in graded for _ in range(k)]
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            rollouts = sampler.sample([p for _, p in chunk], sampled, generator)
            for (i, _), text in zip(chunk, rollouts.texts):
                per_prompt[i].append(task.reward(text, examples[i]))
        per_prompt = [per_prompt[i] for i in graded]
        results[f"avg@{k}"] = sum(sum(s) / k for s in per_prompt) / len(per_prompt)
        results[f"pass@{k}"] = sum(float(max(s) > 0) for s in per_prompt) / len(per_prompt)
    return results
