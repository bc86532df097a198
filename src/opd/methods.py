"""Methods as declarative combinations: where a batch's completions come from, and which objective scores them.

Each method is one entry in ``METHODS``: ``data`` picks the completions (the student's own
samples, reference solutions, teacher samples) and ``loss`` turns them into
``(loss, metrics)`` using the pure objectives. The training loop knows nothing else.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable

import torch

from .config import Config
from .objectives import (
    gkd_loss,
    masked_mean,
    policy_gradient_loss,
    reverse_kl_advantages,
    sft_loss,
    truncated_importance_weights,
)
from .prompts import PromptError, encode_completion, encode_prompt
from .rollout import HFSampler, Rollouts, rollouts_from_completions
from .scoring import completion_hidden_states, projection, rollout_logprobs
from .tasks import Example, Task
from .teachers import ModelTeacher


@dataclass
class Session:
    """Everything a training step reads: the config, the task, the models and their samplers."""

    cfg: Config
    task: Task
    tokenizer: object
    student: torch.nn.Module
    sampler: HFSampler
    teacher: ModelTeacher | None
    teacher_sampler: HFSampler | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    max_prompt_tokens: int | None = None


@dataclass
class Batch:
    rollouts: Rollouts
    examples: list[Example]  # one per row
    on_policy: bool


# ----------------------------------------------------------------------------- data sources


def _prompts(s: Session, examples: list[Example]) -> list[list[int]]:
    encoded = []
    for e in examples:
        try:
            encoded.append(encode_prompt(s.tokenizer, s.task.messages(e), s.max_prompt_tokens))
        except PromptError as err:
            where = e.meta.get("source") or repr(e.prompt[:40])
            raise PromptError(f"{where}: {err} (sampling.max_new_tokens={s.cfg.sampling.max_new_tokens})") from None
    return encoded


def student_samples(s: Session, examples: list[Example], generator: torch.Generator) -> Batch:
    rows = [e for e in examples for _ in range(s.cfg.sampling.samples_per_prompt)]
    rollouts = s.sampler.sample(_prompts(s, rows), s.cfg.sampling, generator)
    return Batch(rollouts, rows, on_policy=True)


def teacher_samples(s: Session, examples: list[Example], generator: torch.Generator) -> Batch:
    if s.teacher_sampler is None:
        raise RuntimeError("teacher samples were requested but no teacher is loaded")
    rollouts = s.teacher_sampler.sample(_prompts(s, examples), s.cfg.sampling, generator)
    return Batch(rollouts, list(examples), on_policy=False)


def reference_solutions(s: Session, examples: list[Example]) -> Batch:
    missing = [e for e in examples if e.solution is None]
    if missing:
        where = missing[0].meta.get("source", "an example")
        raise ValueError(f"{where}: no reference solution, which this method trains on (set task.solution_field)")
    completions = [encode_completion(s.tokenizer, s.task.messages(e), e.solution) for e in examples]
    rollouts = rollouts_from_completions(_prompts(s, examples), completions, s.tokenizer.pad_token_id)
    rollouts.texts = [e.solution for e in examples]
    return Batch(rollouts.to(s.device), list(examples), on_policy=False)


def offline_data(s: Session, examples: list[Example], generator: torch.Generator, use_teacher: bool) -> Batch:
    return teacher_samples(s, examples, generator) if use_teacher else reference_solutions(s, examples)


def _data_opd(s: Session, examples, rng: random.Random, generator) -> Batch:
    return student_samples(s, examples, generator)


def _data_gkd(s: Session, examples, rng: random.Random, generator) -> Batch:
    gkd = s.cfg.method.gkd
    if rng.random() < gkd.lambda_onpolicy:
        return student_samples(s, examples, generator)
    return offline_data(s, examples, generator, use_teacher=gkd.seq_kd)


def _data_sft(s: Session, examples, rng: random.Random, generator) -> Batch:
    return offline_data(s, examples, generator, use_teacher=s.cfg.method.sft.source == "teacher")


# ----------------------------------------------------------------------------- losses


def _loss_opd(s: Session, batch: Batch) -> tuple[torch.Tensor, dict]:
    m, r = s.cfg.method, batch.rollouts
    mask_BC = r.loss_mask_BC.float()
    teacher_logp_BC = s.teacher.token_logprobs(r)
    with s.autocast():
        logp_BC, _ = rollout_logprobs(s.student, r)
    advantages_BC = reverse_kl_advantages(logp_BC, teacher_logp_BC, mask_BC, m.opd.coef, m.opd.discount)
    weights = None
    if m.is_correction_cap is not None and r.sampler_logp_BC is not None:
        weights = truncated_importance_weights(logp_BC, r.sampler_logp_BC, m.is_correction_cap)
    loss, metrics = policy_gradient_loss(logp_BC, logp_BC.detach(), advantages_BC, mask_BC, m.clip_eps, m.reduction, weights)
    metrics["kl"] = float(masked_mean(logp_BC.detach() - teacher_logp_BC, mask_BC))
    return loss, metrics


def _loss_gkd(s: Session, batch: Batch) -> tuple[torch.Tensor, dict]:
    g, r = s.cfg.method.gkd, batch.rollouts
    teacher_hidden = s.teacher.hidden_states(r)
    with s.autocast():
        student_hidden = completion_hidden_states(s.student, r)
    loss, _ = gkd_loss(
        student_hidden,
        teacher_hidden,
        projection(s.student),
        s.teacher.project,
        r.loss_mask_BC,
        g.beta,
        g.temperature,
        g.chunk_size,
        s.cfg.method.reduction,
    )
    return loss, {"jsd": float(loss.detach()), **(_sampled_kl(s, r) if batch.on_policy else {})}


def _loss_sft(s: Session, batch: Batch) -> tuple[torch.Tensor, dict]:
    r = batch.rollouts
    with s.autocast():
        logp_BC, _ = rollout_logprobs(s.student, r)
    loss = sft_loss(logp_BC, r.loss_mask_BC.float(), s.cfg.method.reduction)
    return loss, {}


def _sampled_kl(s: Session, r: Rollouts) -> dict:
    """The per-token reverse-KL estimate mean(ℓ^S - ℓ^T) on the batch's tokens (a diagnostic, no gradient)."""
    if s.teacher is None:
        return {}
    with torch.no_grad(), s.autocast():
        logp_BC, _ = rollout_logprobs(s.student, r)
    return {"kl": float(masked_mean(logp_BC - s.teacher.token_logprobs(r), r.loss_mask_BC.float()))}


@dataclass(frozen=True)
class Method:
    data: Callable[[Session, list[Example], random.Random, torch.Generator], Batch]
    loss: Callable[[Session, Batch], tuple[torch.Tensor, dict]]


METHODS: dict[str, Method] = {
    "opd": Method(_data_opd, _loss_opd),
    "gkd": Method(_data_gkd, _loss_gkd),
    "sft": Method(_data_sft, _loss_sft),
}


def batch_metrics(s: Session, batch: Batch) -> dict[str, float]:
    """Reward (task accuracy) of on-policy samples and completion length."""
    r = batch.rollouts
    metrics = {"completion_tokens": float(r.completion_mask_BC.sum()), "mean_length": float(r.completion_lengths_B.float().mean())}
    if batch.on_policy:
        rewards = [s.task.reward(text, ex) for text, ex in zip(r.texts, batch.examples)]
        metrics["reward"] = sum(rewards) / len(rewards)
    return metrics
