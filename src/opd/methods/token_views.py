"""What a loss said about each sampled token, recorded for ``opd inspect`` (never during training).

Inside ``recording()`` the policy-gradient losses (``losses.sampled_token_loss``, ``grpo.group_policy_loss``) append
one ``TokenView`` per micro-batch: the per-token advantages they trained with, the tokens they trained on (REOPOLD
narrows them), and the teacher's and student's log-probs where there are any. Outside it, ``record`` is a no-op.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

_views: list | None = None


@dataclass
class TokenView:
    rollouts: object  # the batch's Rollouts
    advantages_BC: torch.Tensor
    train_mask_BC: torch.Tensor  # 1 where the loss trained on the token
    teacher_logp_BC: torch.Tensor | None = None
    logp_BC: torch.Tensor | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[TokenView]]:
    global _views
    previous, _views = _views, []
    try:
        yield _views
    finally:
        _views = previous


def record(rollouts, advantages_BC, train_mask_BC, teacher_logp_BC=None, logp_BC=None) -> None:
    if _views is None:
        return
    detach = lambda t: None if t is None else t.detach().float().cpu()  # noqa: E731
    _views.append(TokenView(rollouts, detach(advantages_BC), detach(train_mask_BC), detach(teacher_logp_BC), detach(logp_BC)))
