"""Methods as declarative combinations: where a batch's completions come from, and which objective scores them.

Each method is one entry in ``METHODS``: ``data`` picks the completions (the student's own
samples, reference solutions, teacher samples, or OVD's accepted-or-replaced group) and
``loss`` turns them into ``(loss, metrics)`` using the pure objectives in ``objectives/``.
The training loop knows nothing else.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import Config
from .objectives import (
    f_divergence_advantages,
    gkd_loss,
    gopd_advantages,
    group_advantages,
    k3_kl,
    masked_mean,
    policy_gradient_loss,
    reopold_rewards_and_mask,
    reverse_kl_advantages,
    sft_loss,
    truncated_importance_weights,
)
from .objectives.ovd import ovd_rewards, plan_group
from .profiling import PhaseTimer
from .prompts import PromptError, encode_completion, encode_prompt
from .rollout import HFSampler, Rollouts, left_pad, rollouts_from_completions
from .scoring import completion_hidden_states, loss_head, projection, rollout_logprobs, token_logprobs
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
    teacher: ModelTeacher | None  # or EmaTeacher / RoutedTeacher: anything with token_logprobs
    teacher_sampler: HFSampler | None
    reference: ModelTeacher | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    max_prompt_tokens: int | None = None
    judge: object | None = None  # OVD's verbal judge
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # seconds per phase of the current step


@dataclass
class Batch:
    rollouts: Rollouts
    examples: list[Example]  # one per row
    on_policy: bool
    rewards: list[float] | None = None  # per-row rewards: the task's for student samples, OVD's for its group
    info: dict[str, float] = field(default_factory=dict)  # data-source metrics (OVD acceptance, …)


# ----------------------------------------------------------------------------- data sources


def _prompts(s: Session, examples: list[Example], privileged: bool = False) -> list[list[int]]:
    """Token ids of each example's prompt (the privileged one: problem + reference solution), naming any that fails."""
    messages = s.task.privileged_messages if privileged else s.task.messages
    encoded = []
    for e in examples:
        try:
            encoded.append(encode_prompt(s.tokenizer, messages(e), s.max_prompt_tokens))
        except PromptError as err:
            where = e.meta.get("source") or repr(e.prompt[:40])
            raise PromptError(f"{where}: {err} (sampling.max_new_tokens={s.cfg.sampling.max_new_tokens})") from None
    return encoded


def student_samples(s: Session, examples: list[Example], generator: torch.Generator) -> Batch:
    k = s.cfg.sampling.samples_per_prompt
    rows = [e for e in examples for _ in range(k)]
    rollouts = s.sampler.sample(_prompts(s, rows), s.cfg.sampling, generator)
    rollouts.group_B = [i // k for i in range(len(rows))]  # rows of one prompt share a group
    rollouts.route_B = [e.meta.get("teacher") for e in rows]
    rewards = [s.task.reward(text, e) for text, e in zip(rollouts.texts, rows)]
    return Batch(rollouts, rows, on_policy=True, rewards=rewards)


def teacher_samples(s: Session, examples: list[Example], generator: torch.Generator) -> Batch:
    if s.teacher_sampler is None:
        raise RuntimeError("teacher samples were requested but no teacher is loaded")
    rollouts = s.teacher_sampler.sample(_prompts(s, examples), s.cfg.sampling, generator)
    return Batch(rollouts, list(examples), on_policy=False)


def reference_solutions(s: Session, examples: list[Example], privileged_B: list[bool] | None = None) -> Batch:
    """The examples' reference solutions as completions; rows flagged in ``privileged_B`` sit behind the privileged prompt."""
    missing = [e for e in examples if e.solution is None]
    if missing:
        where = missing[0].meta.get("source", "an example")
        raise ValueError(f"{where}: no reference solution, which this method trains on (set task.solution_field)")
    privileged_B = privileged_B or [False] * len(examples)
    completions = [encode_completion(s.tokenizer, s.task.messages(e), e.solution) for e in examples]
    prompts = [_prompts(s, [e], privileged)[0] for e, privileged in zip(examples, privileged_B)]
    rollouts = rollouts_from_completions(prompts, completions, s.tokenizer.pad_token_id)
    rollouts.texts = [e.solution for e in examples]
    return Batch(rollouts.to(s.device), list(examples), on_policy=False)


def offline_data(s: Session, examples: list[Example], generator: torch.Generator, use_teacher: bool) -> Batch:
    return teacher_samples(s, examples, generator) if use_teacher else reference_solutions(s, examples)


def _data_on_policy(s: Session, examples, rng: random.Random, generator) -> Batch:
    return student_samples(s, examples, generator)


def _data_gkd(s: Session, examples, rng: random.Random, generator) -> Batch:
    gkd = s.cfg.method.gkd
    if rng.random() < gkd.lambda_onpolicy:
        return student_samples(s, examples, generator)
    return offline_data(s, examples, generator, use_teacher=gkd.seq_kd)


def _data_sft(s: Session, examples, rng: random.Random, generator) -> Batch:
    sft = s.cfg.method.sft
    if sft.privileged_fraction > 0:
        return reference_solutions(s, examples, [rng.random() < sft.privileged_fraction for _ in examples])
    return offline_data(s, examples, generator, use_teacher=sft.source == "teacher")


def _data_ovd(s: Session, examples, rng: random.Random, generator) -> Batch:
    """Student group → verbal scores → accept (score ≥ θ) or replace by a teacher demonstration."""
    o = s.cfg.method.ovd
    sampled = student_samples(s, examples, generator)
    r = sampled.rollouts
    with s.timer.phase("judge"):
        scores = s.judge.score(sampled.examples, r.texts)
        step_scores = [s.judge.step_scores(e, t) for e, t in zip(sampled.examples, r.texts)] if o.replacement == "step" else None
    plan = plan_group(r.texts, scores, o.threshold, o.replacement, step_scores)
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(r.completion_ids_BC, r.completion_mask_BC)]
    texts = list(r.texts)
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(r.prompt_ids_BP, r.prompt_mask_BP)]
    replace_rows = [i for i, member in enumerate(plan) if member.source != "student"]
    if replace_rows:
        prefixes = [s.tokenizer(texts[i][: plan[i].keep_prefix_chars], add_special_tokens=False)["input_ids"] for i in replace_rows]
        demos = s.teacher_sampler.sample([prompts[i] + p for i, p in zip(replace_rows, prefixes)], s.cfg.sampling, generator)
        for j, i in enumerate(replace_rows):
            tail = demos.completion_ids_BC[j][demos.completion_mask_BC[j].bool()].tolist()
            completions[i] = prefixes[j] + tail
            texts[i] = texts[i][: plan[i].keep_prefix_chars] + demos.texts[j]
    outcomes = list(sampled.rewards)  # kept samples keep their reward; replaced ones are graded anew
    for i in replace_rows:
        outcomes[i] = s.task.reward(texts[i], sampled.examples[i])
    final_scores = scores
    if o.score_weight:
        final_scores = [scores[i] if plan[i].source == "student" else None for i in range(len(plan))]
        with s.timer.phase("judge"):
            rescored = s.judge.score([sampled.examples[i] for i in replace_rows], [texts[i] for i in replace_rows]) if replace_rows else []
        for i, value in zip(replace_rows, rescored):
            final_scores[i] = value
    rollouts = rollouts_from_completions(prompts, completions, s.tokenizer.pad_token_id, texts).to(s.device)
    rollouts.group_B = list(r.group_B)
    dropped = [i for i in replace_rows if o.drop_failed_demonstrations and outcomes[i] <= 0]
    for i in dropped:  # a group of its own (zero advantage) with no trained tokens
        rollouts.loss_mask_BC[i] = 0
        rollouts.group_B[i] = -1 - i
    info = {
        "reward": sum(sampled.rewards) / len(sampled.rewards),
        "judge_score": sum(scores) / len(scores),
        "accepted_fraction": sum(m.source == "student" for m in plan) / len(plan),
        "student_tokens": float(r.completion_mask_BC.sum()),
        "dropped_fraction": len(dropped) / len(plan),
    }
    if replace_rows:
        info["demonstration_reward"] = sum(outcomes[i] for i in replace_rows) / len(replace_rows)
    return Batch(rollouts, sampled.examples, on_policy=False, rewards=ovd_rewards(outcomes, final_scores, o.score_weight), info=info)


# ----------------------------------------------------------------------------- losses

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor, dict]]


def _sampled_token_loss(
    s: Session, batch: Batch, advantages: AdvantageFn, teacher_rollouts: Rollouts | None = None, with_entropy: bool = False
) -> tuple[torch.Tensor, dict]:
    """Teacher log-probs of the sampled tokens → per-token advantages → the shared surrogate.

    ``advantages(student_logp_BC, teacher_logp_BC, entropy_BC, mask_BC)`` returns
    ``(advantages_BC, mask_BC, metrics)``; the mask may narrow the loss mask (REOPOLD).
    ``teacher_rollouts`` are the same completions behind the teacher's own prompts (OPSD);
    the student's entropy is computed only ``with_entropy`` (None otherwise).
    """
    m, r = s.cfg.method, batch.rollouts
    mask_BC = r.loss_mask_BC.float()
    with s.timer.phase("teacher"):
        teacher_logp_BC = s.teacher.token_logprobs(teacher_rollouts if teacher_rollouts is not None else r)
    with s.autocast():
        logp_BC, entropy_BC = rollout_logprobs(s.student, r, with_entropy=with_entropy)
    advantages_BC, train_mask_BC, metrics = advantages(logp_BC.detach(), teacher_logp_BC, entropy_BC, mask_BC)
    weights = None
    if m.is_correction_cap is not None and r.sampler_logp_BC is not None:
        weights = truncated_importance_weights(logp_BC, r.sampler_logp_BC, m.is_correction_cap)
    loss, pg_metrics = policy_gradient_loss(logp_BC, logp_BC.detach(), advantages_BC, train_mask_BC, m.clip_eps, m.reduction, weights)
    metrics.update(pg_metrics, kl=float(masked_mean(logp_BC.detach() - teacher_logp_BC, mask_BC)))
    return loss, metrics


def _loss_opd(s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
    c = s.cfg.method.opd
    return _sampled_token_loss(
        s, batch, lambda lp, tlp, ent, mask: (reverse_kl_advantages(lp, tlp, mask, c.coef, c.discount), mask, {})
    )


def _loss_opd_plus(s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
    c = s.cfg.method.opd_plus

    def advantages(lp, tlp, ent, mask):
        adv, metrics = f_divergence_advantages(lp, tlp, mask, c.divergence, c.unbiased, c.discount, c.log_ratio_clip)
        return adv, mask, metrics

    return _sampled_token_loss(s, batch, advantages)


def _loss_gopd(s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
    c = s.cfg.method.gopd
    with s.timer.phase("teacher"):
        ref_logp_BC = s.reference.token_logprobs(batch.rollouts) if s.reference is not None else None
    return _sampled_token_loss(
        s, batch, lambda lp, tlp, ent, mask: (gopd_advantages(lp, tlp, ref_logp_BC, mask, c.reward_scale, c.discount), mask, {})
    )


def _loss_reopold(s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
    c = s.cfg.method.reopold
    switch = c.switch_step if c.switch_step is not None else s.cfg.train.steps // 2

    def advantages(lp, tlp, ent, mask):
        return reopold_rewards_and_mask(lp, tlp, ent, mask, step, switch, c.mixture_lambda, c.entropy_fraction, c.floor_form)

    return _sampled_token_loss(s, batch, advantages, with_entropy=True)


def _loss_grpo(s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
    m, r = s.cfg.method, batch.rollouts
    mask_BC = r.loss_mask_BC.float()
    rewards_B = torch.tensor(batch.rewards, device=mask_BC.device)
    groups_B = torch.tensor(r.group_B, device=mask_BC.device)
    advantages_BC = group_advantages(rewards_B, groups_B, scale=m.grpo.scale_by_std)[:, None].expand_as(mask_BC)
    with s.autocast():
        logp_BC, _ = rollout_logprobs(s.student, r)
    loss, metrics = policy_gradient_loss(logp_BC, logp_BC.detach(), advantages_BC, mask_BC, m.clip_eps, m.reduction)
    if s.reference is not None and m.grpo.kl_coef > 0:
        with s.timer.phase("teacher"):
            ref_logp_BC = s.reference.token_logprobs(r)
        kl = masked_mean(k3_kl(logp_BC, ref_logp_BC), mask_BC, m.reduction)
        loss = loss + m.grpo.kl_coef * kl
        metrics["kl_ref"] = float(kl.detach())
    return loss, metrics


def privileged_view(s: Session, batch: Batch) -> Rollouts:
    """The batch's completions behind each example's privileged prompt (problem + reference solution)."""
    ids_BP, mask_BP = left_pad(_prompts(s, batch.examples, privileged=True), s.tokenizer.pad_token_id)
    return batch.rollouts.with_prompts(ids_BP.to(s.device), mask_BP.to(s.device))


def _loss_opsd(s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
    o = s.cfg.method.opsd
    teacher_view = privileged_view(s, batch)
    if o.loss == "sampled":  # A_n = ℓ^T_n - ℓ^S_n, the reverse-KL advantage with c = 1
        return _sampled_token_loss(s, batch, lambda lp, tlp, ent, mask: (reverse_kl_advantages(lp, tlp, mask), mask, {}), teacher_view)
    temperature = o.temperature if o.temperature is not None else s.cfg.sampling.temperature
    return _full_vocabulary_loss(s, batch, teacher_view, o.beta, temperature, o.chunk_size, o.top_k, o.top_k_tail)


def _loss_gkd(s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
    g = s.cfg.method.gkd
    return _full_vocabulary_loss(s, batch, batch.rollouts, g.beta, g.temperature, g.chunk_size, g.top_k, g.top_k_tail)


def _full_vocabulary_loss(
    s: Session, batch: Batch, teacher_rollouts: Rollouts, beta: float, temperature: float,
    chunk_size: int | None, top_k: int | None, top_k_tail: bool,
) -> tuple[torch.Tensor, dict]:
    """GKD's JSD_β between the teacher (scoring ``teacher_rollouts``: the batch, or OPSD's privileged view) and the student."""
    r = batch.rollouts
    with s.timer.phase("teacher"):
        teacher_hidden = s.teacher.hidden_states(teacher_rollouts)
    with s.autocast():
        student_hidden = completion_hidden_states(s.student, r)
    result = gkd_loss(
        student_hidden, teacher_hidden, loss_head(s.student), s.teacher.project, r.loss_mask_BC,
        beta, temperature, chunk_size, s.cfg.method.reduction, top_k, top_k_tail,
    )
    metrics = {"jsd": float(result.loss.detach())}
    if batch.on_policy:  # on other data ℓ^S - ℓ^T estimates nothing
        metrics["kl"] = _sampled_kl(s, r, student_hidden, teacher_hidden)
    if result.teacher_mass is not None:  # how much of the teacher's probability the kept top-k tokens cover
        metrics["teacher_topk_mass"] = result.teacher_mass
    return result.loss, metrics


def _loss_sft(s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
    r = batch.rollouts
    with s.autocast():
        logp_BC, _ = rollout_logprobs(s.student, r)
    loss = sft_loss(logp_BC, r.loss_mask_BC.float(), s.cfg.method.reduction)
    return loss, {}


def _sampled_kl(s: Session, r: Rollouts, student_hidden_BCH: torch.Tensor, teacher_hidden_BCH: torch.Tensor) -> float:
    """The per-token reverse-KL estimate mean(ℓ^S - ℓ^T) on the sampled tokens, from hidden states already computed."""
    valid = r.loss_mask_BC.bool()
    ids_N = r.completion_ids_BC[valid]
    with torch.no_grad():
        student_logp_N, _ = token_logprobs(student_hidden_BCH.detach()[valid], ids_N, projection(s.student))
        teacher_logp_N, _ = token_logprobs(teacher_hidden_BCH[valid], ids_N, s.teacher.project)
    return float((student_logp_N - teacher_logp_N).mean()) if ids_N.numel() else 0.0


@dataclass(frozen=True)
class Method:
    data: Callable[[Session, list[Example], random.Random, torch.Generator], Batch]
    loss: Callable[[Session, Batch, int], tuple[torch.Tensor, dict]]


METHODS: dict[str, Method] = {
    "opd": Method(_data_on_policy, _loss_opd),
    "gkd": Method(_data_gkd, _loss_gkd),
    "sft": Method(_data_sft, _loss_sft),
    "opd_plus": Method(_data_on_policy, _loss_opd_plus),
    "gopd": Method(_data_on_policy, _loss_gopd),
    "reopold": Method(_data_on_policy, _loss_reopold),
    "grpo": Method(_data_on_policy, _loss_grpo),
    "opsd": Method(_data_on_policy, _loss_opsd),
    "ovd": Method(_data_ovd, _loss_grpo),
}


def batch_metrics(s: Session, batch: Batch) -> dict[str, float]:
    """Completion length, tokens the student generated, and the reward (task accuracy) of its own samples."""
    r = batch.rollouts
    metrics = {"mean_length": float(r.completion_lengths_B.float().mean()), "student_tokens": 0.0}
    if batch.on_policy:
        metrics.update(reward=sum(batch.rewards) / len(batch.rewards), student_tokens=float(r.completion_mask_BC.sum()))
    metrics.update(batch.info)
    return metrics
