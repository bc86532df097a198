"""GKD: on-policy generalised-JSD distillation over the full vocabulary (Agarwal et al. 2024, arXiv 2306.13649).

    L = Σ_{i,t} w_{i,t} · D_β(P_T(·|s_{i,t}) ‖ P_S(·|s_{i,t}))     (see ``generalized_jsd``)

with ``w`` the reduction's weights (``m/Σm`` for the token mean). The completions come from
the student with probability λ_onpolicy, otherwise from the dataset (or the teacher,
``seq_kd``). OPSD's JSD loss is the same function with the privileged-context teacher.
The loss is computed by the fused chunked divergence (``fused.py``) when the student's
output layer is a plain linear layer, else by streaming checkpointed chunks.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch

from .common import Normaliser, Reduction, reduction_weights
from .divergences import generalized_jsd, on_teacher_top_k, streamed_divergence
from .fused import DenseTeacher, OutputHead, fused_divergence

Projection = Callable[[torch.Tensor], torch.Tensor]


class GKDLoss(NamedTuple):
    loss: torch.Tensor
    per_token_BT: torch.Tensor  # D_β at each position (0 where masked), no gradient with the fused path
    teacher_mass: float | None  # mean teacher probability on the kept top-k tokens; None over the full vocabulary
    # with token_ids_BT on the fused path: mean over valid positions of ℓ^S - ℓ^T, the untempered log-probs of
    # those tokens (the sampled-token reverse-KL estimate when the tokens are the student's samples); else None
    sampled_kl: float | None = None


def gkd_loss(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    student_head: OutputHead | Projection,
    teacher_project: Projection,
    mask_BT: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 0.9,
    chunk_size: int | None = None,
    reduction: Reduction | Normaliser = "token_mean",
    top_k: int | None = None,
    top_k_tail: bool = False,
    token_ids_BT: torch.Tensor | None = None,
) -> GKDLoss:
    """The reduced generalised JSD between student and teacher next-token distributions.

    ``student_head``: an ``OutputHead`` (fused path) or any hidden → logits callable (checkpointed
    path). ``top_k`` restricts both distributions to the teacher's K most likely tokens,
    renormalised, or — ``top_k_tail`` — with the remaining mass as one extra class. ``token_ids_BT``: also
    estimate ``mean(ℓ^S - ℓ^T)`` on those tokens inside the fused loop (``sampled_kl``; fused path only).
    """
    valid_BT = mask_BT.bool()
    weight_N = reduction_weights(mask_BT, reduction, torch.promote_types(student_hidden_BTH.dtype, torch.float32))[valid_BT]
    student_hidden_NH, teacher_hidden_NH = student_hidden_BTH[valid_BT], teacher_hidden_BTH[valid_BT]
    mass = sampled_kl = None
    if isinstance(student_head, OutputHead):
        ids_N = None if token_ids_BT is None else token_ids_BT[valid_BT]
        result = fused_divergence(
            student_hidden_NH, student_head, DenseTeacher.from_hidden(teacher_hidden_NH, teacher_project), weight_N,
            beta, temperature, top_k, top_k_tail, chunk_size, ids_N,
        )
        loss, values_N = result.loss, result.per_token_N
        if result.teacher_mass_N is not None and result.teacher_mass_N.numel():
            mass = float(result.teacher_mass_N.mean())
        if ids_N is not None:
            n = ids_N.numel()
            sampled_kl = float((result.student_token_logp_N - result.teacher_token_logp_N).mean()) if n else 0.0
    else:
        if top_k_tail:
            raise ValueError("the top-k tail bucket needs a plain linear output layer (fused path)")
        divergence = partial(generalized_jsd, beta=beta, temperature=temperature)
        if top_k is not None:
            divergence = partial(on_teacher_top_k, divergence=divergence, k=top_k)
        values_N = streamed_divergence(
            student_hidden_NH, teacher_hidden_NH, student_head, teacher_project, divergence, chunk_size or 1024
        )
        loss = (values_N * weight_N.to(values_N.dtype)).sum()
        if not values_N.numel():  # nothing to train on: a zero loss that still reaches the student (backward works)
            loss = loss + 0.0 * student_hidden_BTH.sum()
    per_token_BT = torch.zeros(valid_BT.shape, dtype=values_N.dtype, device=values_N.device)
    return GKDLoss(loss, per_token_BT.masked_scatter(valid_BT, values_N.detach()), mass, sampled_kl)
