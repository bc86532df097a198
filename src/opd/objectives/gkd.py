"""GKD: on-policy generalised-JSD distillation over the full vocabulary (Agarwal et al. 2024, arXiv 2306.13649).

    L = (1/N) Σ_{i,t} m_{i,t} · D_β(P_T(·|s_{i,t}) ‖ P_S(·|s_{i,t}))     (see ``generalized_jsd``)

The completions come from the student with probability λ_onpolicy, otherwise from the
dataset (or the teacher, ``seq_kd``). Teacher and student logits are streamed in chunks.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from .common import Reduction, masked_mean
from .divergences import generalized_jsd, on_teacher_top_k, streamed_divergence


def gkd_loss(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    student_project: Callable[[torch.Tensor], torch.Tensor],
    teacher_project: Callable[[torch.Tensor], torch.Tensor],
    mask_BT: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 0.9,
    chunk_size: int = 1024,
    reduction: Reduction = "token_mean",
    top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, jsd_BT)``: the masked mean of the per-token generalised JSD, and the per-token values.

    ``top_k`` restricts both distributions to the teacher's K most likely tokens, renormalised.
    """
    divergence = partial(generalized_jsd, beta=beta, temperature=temperature)
    if top_k is not None:
        divergence = partial(on_teacher_top_k, divergence=divergence, k=top_k)
    valid_BT = mask_BT.bool()
    jsd_N = streamed_divergence(
        student_hidden_BTH[valid_BT],
        teacher_hidden_BTH[valid_BT],
        student_project,
        teacher_project,
        divergence,
        chunk_size,
    )
    jsd_BT = torch.zeros(valid_BT.shape, dtype=jsd_N.dtype, device=jsd_N.device).masked_scatter(valid_BT, jsd_N)
    return masked_mean(jsd_BT, mask_BT, reduction), jsd_BT
