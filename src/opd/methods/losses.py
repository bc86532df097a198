"""The loss bodies most methods share: the policy-gradient surrogate (fed by the teacher's sampled-token log-probs,
or by group-normalised rewards) and the full-vocabulary divergence.

A method supplies the piece that is its own — the per-token advantages, the rewards, or β / τ / top-k —
and these run the teacher, the student and the one surrogate (``policy_gradient_surrogate``;
docs/methods.md, "The shared update rule").
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from ..models.loading import output_size
from ..models.rollouts import Rollouts
from ..models.scoring import completion_hidden_states, loss_head, projection, rollout_logprobs, token_logprobs
from ..objectives import (
    gkd_loss,
    group_advantages,
    k3_kl,
    masked_mean,
    policy_gradient_loss,
    truncated_importance_weights,
)
from ..objectives.common import reduction_weights
from ..objectives.cross_vocab import hybrid_divergence, projected_divergence, streamed_cross_vocab
from ..objectives.fused import SparseTeacher, auto_chunk_size, fused_divergence, output_head
from ..teachers.base import HiddenStates, TopLogprobs
from . import token_views
from .base import Session
from .batch import Batch

# (student_logp_BC, teacher_logp_BC, mask_BC) -> (advantages_BC, train_mask_BC, metrics)
AdvantageFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def policy_gradient_surrogate(
    s: Session, batch: Batch, logp_BC: torch.Tensor, old_logp_BC: torch.Tensor, advantages_BC: torch.Tensor,
    train_mask_BC: torch.Tensor, teacher_logp_BC: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The shared update rule on ``batch``: ``-Σ w · ρ · A`` over the trained tokens, weighted by the step's normaliser,
    ``ρ = exp(ℓ^θ − sg(ℓ^old))`` (PPO-clipped with ``method.clip_eps``), times the truncated importance weight where
    one applies; the advantages are recorded for ``opd inspect``."""
    weights = importance_weights(s, batch.rollouts, old_logp_BC)
    loss, metrics = policy_gradient_loss(
        logp_BC, old_logp_BC, advantages_BC, train_mask_BC, s.cfg.method.clip_eps, s.method.normaliser(batch), weights
    )
    if weights is not None and (trained := train_mask_BC.bool()).any():  # how far the sampler's weights were from these
        metrics["is_weight_mean"] = float(weights[trained].mean())
        metrics["is_weight_clipped"] = float((weights[trained] >= s.method.importance_cap()).float().mean())
    token_views.record(batch.rollouts, advantages_BC, train_mask_BC, teacher_logp_BC, logp_BC)
    return loss, metrics


def sampled_token_loss(s: Session, batch: Batch, advantages: AdvantageFn, teacher_rollouts: Rollouts | None = None) -> tuple[torch.Tensor, dict]:
    """Teacher log-probs of the sampled tokens → per-token advantages → the shared surrogate.

    Advantages are computed from ``ℓ^old`` (fixed across a step's updates). The advantage function
    may narrow the loss mask (REOPOLD: to the batch's ``train_mask_BC``, which the step's
    normaliser counts). Teacher log-probs already in ``batch.teacher_logp_BC`` are reused;
    ``teacher_rollouts`` are the same completions behind the teacher's own prompts (OPSD).

    A teacher with its own tokenizer (``teachers.cross_tokenizer``) scores spans: the advantage function then sees one
    entry per span — the span's summed student and teacher log-probs, on its last token — and each student token of
    a span is trained with its span's advantage (docs/methods.md, "A teacher with another tokenizer").
    """
    r = batch.rollouts
    mask_BC = r.loss_mask_BC.float()
    teacher_logp_BC = batch.teacher_logp_BC  # with its spans, where prepare_step scored them (REOPOLD)
    if teacher_logp_BC is None and teacher_rollouts is None and s.teacher.reads_text:
        batch.spans = teacher_span_scores(s, batch)
        teacher_logp_BC = batch.spans.teacher_logp_BC
    elif teacher_logp_BC is None:
        batch.spans = None
        teacher_logp_BC = teacher_token_logprobs(s, teacher_rollouts if teacher_rollouts is not None else r)
    logp_BC, _ = student_token_logprobs(s, r)
    old_logp_BC = old_logprobs(batch, logp_BC)
    spans = batch.spans
    scored_mask_BC = mask_BC if spans is None else spans.span_mask(mask_BC)  # per token, or per span (its last token)
    scored_logp_BC = logp_BC.detach() if spans is None else spans.collapse(logp_BC.detach())
    advantages_BC, train_mask_BC, metrics = advantages(old_logp_BC if spans is None else spans.collapse(old_logp_BC), teacher_logp_BC, scored_mask_BC)
    if spans is not None:  # every student token of a span takes its span's advantage
        advantages_BC, train_mask_BC = spans.spread(advantages_BC) * mask_BC, spans.spread(train_mask_BC) * mask_BC
        metrics["spans_per_token"] = float(scored_mask_BC.sum() / mask_BC.sum().clamp(min=1))
        if spans.cut_tokens:  # the teacher's copy of some rows ran past its context
            metrics["teacher_context_cut_tokens"] = float(spans.cut_tokens)
    impossible = int((~torch.isfinite(teacher_logp_BC) & scored_mask_BC.bool()).sum())
    if impossible:  # the teacher gives probability 0 to tokens the student sampled
        metrics["teacher_impossible_tokens"] = float(impossible)
    shown_teacher_BC = teacher_logp_BC if spans is None else spans.spread(teacher_logp_BC)
    loss, pg_metrics = policy_gradient_surrogate(s, batch, logp_BC, old_logp_BC, advantages_BC, train_mask_BC, shown_teacher_BC)
    metrics.update(pg_metrics, kl=float(masked_mean(scored_logp_BC - teacher_logp_BC, scored_mask_BC)))
    return loss, metrics


def reward_advantages(batch: Batch, scale_by_std: bool = True, std: str = "sample") -> torch.Tensor:
    """``[B]`` each row's reward as its group-normalised advantage ``A_i = (r_i − mean_g r) / (std_g r + ε)``
    (``objectives.group_advantages``; GRPO's, and OVD's with the final group as baseline)."""
    rewards_B = torch.tensor(batch.rewards, dtype=torch.float32)
    return group_advantages(rewards_B, torch.tensor(batch.rollouts.group_B), scale=scale_by_std, unbiased=std == "sample")


def group_policy_loss(s: Session, batch: Batch, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The method's per-row advantages (``Method.advantages``: a group baseline's, the same for every token of the
    row) in the shared surrogate, plus ``kl_coef`` times a k3 KL to ``s.reference`` (GRPO, OVD)."""
    r = batch.rollouts
    mask_BC = r.loss_mask_BC.float()
    advantages_BC = s.method.advantages(batch).to(mask_BC.device, mask_BC.dtype)[:, None].expand_as(mask_BC)
    logp_BC, _ = student_token_logprobs(s, r)
    old_logp_BC = old_logprobs(batch, logp_BC)
    loss, metrics = policy_gradient_surrogate(s, batch, logp_BC, old_logp_BC, advantages_BC, mask_BC)
    if s.reference is not None and kl_coef > 0:
        ref_logp_BC = reference_token_logprobs(s, r)
        kl = masked_mean(k3_kl(logp_BC, ref_logp_BC), mask_BC, s.method.normaliser(batch))
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = float(kl.detach())
    return loss, metrics


def student_token_logprobs(s: Session, r: Rollouts, with_entropy: bool = False):
    """``(ℓ^S_BC, entropy_BC)`` of the sampled tokens under the policy that sampled them: the student's softmax at
    the sampling temperature (so the estimators are on-policy whatever τ is), with gradient."""
    with s.autocast():
        return rollout_logprobs(s.student, r, s.method.student_temperature(), with_entropy=with_entropy, packed=s.cfg.train.packing)


def old_logprobs(batch: Batch, logp_BC: torch.Tensor) -> torch.Tensor:
    """``sg(ℓ^old)``: the policy that made the batch — its log-probs from before this step's first update when the
    step makes several updates (``train.updates_per_batch``), else the current ones (ρ = 1 in value)."""
    return batch.old_logp_BC if batch.old_logp_BC is not None else logp_BC.detach()


def teacher_token_logprobs(s: Session, r: Rollouts) -> torch.Tensor:
    """``ℓ^T_BC``: the teacher's log-probs of the sampled tokens at its own scoring temperature (``teacher.temperature``)."""
    with s.timer.phase("teacher"):
        return s.teacher.token_logprobs(r, s.cfg.teacher.temperature)


def teacher_span_scores(s: Session, batch: Batch):
    """A teacher with its own tokenizer: the batch's spans and the teacher's log-prob of each (``SpanScores``)."""
    with s.timer.phase("teacher"):
        return s.teacher.span_scores(batch.rollouts, batch.examples, s.cfg.teacher.temperature)


def reference_token_logprobs(s: Session, r: Rollouts) -> torch.Tensor:
    """``ℓ^ref_BC``: the reference (e.g. the initial student) at the student's sampling temperature."""
    with s.timer.phase("teacher"):
        return s.reference.token_logprobs(r, s.method.student_temperature())


def importance_weights(s: Session, r: Rollouts, logp_BC: torch.Tensor) -> torch.Tensor | None:
    """``sg(min(exp(ℓ^S - ℓ^sampler), C))`` where a cap applies and the sampler reported its log-probs, else None."""
    cap = s.method.importance_cap()
    if cap is None or r.sampler_logp_BC is None:
        return None
    return truncated_importance_weights(logp_BC, r.sampler_logp_BC, cap)


def full_vocabulary_loss(
    s: Session, batch: Batch, teacher_rollouts: Rollouts, beta: float, temperature: float,
    chunk_size: int | None, top_k: int | None, top_k_tail: bool,
) -> tuple[torch.Tensor, dict]:
    """GKD's JSD_β between the teacher (scoring ``teacher_rollouts``: the batch, or OPSD's privileged view) and the student.

    A teacher that gives hidden states is streamed through the fused divergence; one that
    gives only its top-k log-probs (``TopLogprobs``) is the fused divergence's sparse teacher,
    with the rest of its mass as a tail bucket.
    """
    r = batch.rollouts
    with s.timer.phase("teacher"):
        teacher = s.teacher.distributions(teacher_rollouts)
    with s.autocast():
        student_hidden = completion_hidden_states(s.student, r, s.cfg.train.packing)
    if isinstance(teacher, TopLogprobs):
        return _sparse_teacher_loss(s, batch, student_hidden, teacher, beta, temperature, chunk_size, top_k)
    on_policy_ids = r.completion_ids_BC if batch.on_policy else None  # on other data ℓ^S - ℓ^T estimates nothing
    result = gkd_loss(
        student_hidden, teacher.hidden_BCH, loss_head(s.student), teacher.project, r.loss_mask_BC,
        beta, temperature, chunk_size, s.method.normaliser(batch), top_k, top_k_tail, on_policy_ids,
    )
    metrics = {"jsd": float(result.loss.detach())}
    if batch.on_policy:  # the fused loop estimated it; the unfused path (a wrapped output layer) projects again
        metrics["kl"] = result.sampled_kl if result.sampled_kl is not None else sampled_kl(s, r, student_hidden, teacher)
    if result.teacher_mass is not None:  # how much of the teacher's probability the kept top-k tokens cover
        metrics["teacher_topk_mass"] = result.teacher_mass
    return result.loss, metrics


def cross_vocabulary_loss(s: Session, batch: Batch, beta: float, temperature: float, chunk_size: int | None, mode: str = "projection",
                          matched_weight: float = 1.0, unmatched_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """GKD with a teacher of its own tokenizer (``teachers.cross_tokenizer``), by ``mode`` (``method.gkd.cross_vocab``):
    ``projection`` — D_β between the student and the teacher's distribution mapped onto the student's vocabulary, at
    every student token of a span (past the text of the teacher token the student has written already) — or ``hybrid`` — GOLD/ULD's hybrid at the spans of one token on each side
    (``objectives.cross_vocab``). Positions are weighted by the step's reduction as GKD's are; the other trained
    tokens get no gradient and still count in the reduction's N (docs/methods.md, "A teacher with another tokenizer")."""
    r = batch.rollouts
    with s.timer.phase("teacher"):
        aligned = s.teacher.aligned_distributions(r, batch.examples, every_token=mode == "projection")
    with s.autocast():
        student_hidden_BCH = completion_hidden_states(s.student, r, s.cfg.train.packing)
    mask_BC = r.loss_mask_BC
    rows_N, columns_N = (mask_BC.bool() & (aligned.column_BC >= 0)).nonzero(as_tuple=True)
    weight_N = reduction_weights(mask_BC, s.method.normaliser(batch), torch.float32)[rows_N, columns_N]
    relation = s.teacher.match.to(student_hidden_BCH.device)
    if mode == "projection":
        divergence = partial(projected_divergence, projection=relation, beta=beta, temperature=temperature, prefixes=aligned.prefixes)
    else:
        divergence = partial(hybrid_divergence, match=relation, beta=beta, temperature=temperature,
                             matched_weight=matched_weight, unmatched_weight=unmatched_weight)
    keys_N = aligned.key_BC[rows_N, columns_N] if aligned.key_BC is not None else None
    values_N3 = streamed_cross_vocab(student_hidden_BCH[rows_N, columns_N], aligned.hidden_BTH[rows_N, aligned.column_BC[rows_N, columns_N]],
                                     projection(s.student), aligned.project, divergence,
                                     chunk_size or auto_chunk_size(2 * output_size(s.student)), keys_N)  # (both sides' logits)
    loss = (values_N3[:, 0] * weight_N).sum() + 0.0 * student_hidden_BCH.sum()  # reaches the student with no aligned token
    trained = float(mask_BC.sum().clamp(min=1))
    metrics = {"jsd": float(loss.detach()), "aligned_tokens": len(rows_N) / trained}
    if len(rows_N) and mode == "projection":  # how much of the teacher's probability maps onto the student's tokens
        metrics["teacher_mapped_mass"] = float(values_N3[:, 1].detach().mean())
        if (unmapped := int((values_N3[:, 1] == 0).sum())):  # positions with no target at all (no loss there)
            metrics["teacher_unmapped_positions"] = float(unmapped)
    elif len(rows_N):
        metrics.update(hybrid_matched=float(values_N3[:, 1].detach().mean()), hybrid_unmatched=float(values_N3[:, 2].detach().mean()))
    if aligned.cut_tokens:
        metrics["teacher_context_cut_tokens"] = float(aligned.cut_tokens)
    return loss, metrics


def _sparse_teacher_loss(s: Session, batch: Batch, student_hidden_BCH, teacher: TopLogprobs, beta, temperature, chunk_size, top_k):
    if top_k is not None:
        raise ValueError("a teacher that gives only its top-k log-probs fixes k itself; leave the method's top_k unset")
    head = output_head(s.student)
    if head is None:
        raise ValueError("a top-k-only teacher needs the student's output layer to be a plain linear layer (no LoRA on lm_head)")
    r = batch.rollouts
    valid_BC = r.loss_mask_BC.bool()
    weight_N = reduction_weights(r.loss_mask_BC, s.method.normaliser(batch), torch.promote_types(student_hidden_BCH.dtype, torch.float32))
    sparse = SparseTeacher(teacher.ids_BCK[valid_BC], teacher.logp_BCK[valid_BC].float())
    with_kl = batch.on_policy and teacher.token_logp_BC is not None
    ids_N = r.completion_ids_BC[valid_BC] if with_kl else None
    result = fused_divergence(
        student_hidden_BCH[valid_BC], head, sparse, weight_N[valid_BC], beta, temperature, None, True, chunk_size, ids_N
    )
    metrics = {"jsd": float(result.loss.detach())}
    if with_kl and ids_N.numel():  # the served teacher's log-prob of each sampled token came with its top-k
        metrics["kl"] = float((result.student_token_logp_N - teacher.token_logp_BC[valid_BC].float()).mean())
    if result.teacher_mass_N is not None and result.teacher_mass_N.numel():
        metrics["teacher_topk_mass"] = float(result.teacher_mass_N.mean())
    return result.loss, metrics


def sampled_kl(s: Session, r: Rollouts, student_hidden_BCH: torch.Tensor, teacher: HiddenStates) -> float:
    """The per-token reverse-KL estimate mean(ℓ^S - ℓ^T) on the sampled tokens, from hidden states already computed."""
    valid = r.loss_mask_BC.bool()
    ids_N = r.completion_ids_BC[valid]
    with torch.no_grad():
        student_logp_N, _ = token_logprobs(student_hidden_BCH.detach()[valid], ids_N, projection(s.student))
        teacher_logp_N, _ = token_logprobs(teacher.hidden_BCH[valid], ids_N, teacher.project)
    return float((student_logp_N - teacher_logp_N).mean()) if ids_N.numel() else 0.0
