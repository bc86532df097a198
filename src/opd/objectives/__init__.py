"""Objectives: pure tensor functions, one module per method, the formula in each docstring."""

from .common import (
    Normaliser,
    discounted_cumsum,
    masked_mean,
    policy_gradient_loss,
    reduction_weights,
    step_normaliser,
    truncated_importance_weights,
)
from .divergences import generalized_jsd, streamed_divergence
from .fused import DenseTeacher, OutputHead, SparseTeacher, fused_divergence
from .gkd import gkd_loss
from .gopd import gopd_advantages
from .grpo import group_advantages, k3_kl
from .opd import reverse_kl_advantages
from .opd_plus import F_DIVERGENCES, f_divergence_advantages
from .reopold import entropy_top_fraction_mask, reopold_rewards_and_mask, reward_floor
from .sft import sft_loss

__all__ = [
    "DenseTeacher",
    "Normaliser",
    "F_DIVERGENCES",
    "OutputHead",
    "SparseTeacher",
    "fused_divergence",
    "reduction_weights",
    "step_normaliser",
    "discounted_cumsum",
    "entropy_top_fraction_mask",
    "f_divergence_advantages",
    "gopd_advantages",
    "group_advantages",
    "k3_kl",
    "reopold_rewards_and_mask",
    "reward_floor",
    "generalized_jsd",
    "gkd_loss",
    "masked_mean",
    "policy_gradient_loss",
    "reverse_kl_advantages",
    "sft_loss",
    "streamed_divergence",
    "truncated_importance_weights",
]
