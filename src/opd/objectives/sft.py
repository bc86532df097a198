"""Supervised fine-tuning (docs/methods.md#sft): cross-entropy on given completions.

    L = -(1/N) Σ_{i,t} m_{i,t} · log π_θ(y_{i,t} | x_i, y_{i,<t})

The completions are reference solutions, or teacher samples (sequence-level distillation).
"""

from __future__ import annotations

import torch

from .common import Normaliser, Reduction, masked_mean


def sft_loss(logp_BT: torch.Tensor, mask_BT: torch.Tensor, reduction: Reduction | Normaliser = "token_mean") -> torch.Tensor:
    """Mean negative log-likelihood of the masked tokens."""
    return -masked_mean(logp_BT, mask_BT, reduction)
