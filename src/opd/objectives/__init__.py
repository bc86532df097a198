"""Objectives: pure tensor functions, one module per method, the formula in each docstring."""

from .common import discounted_cumsum, masked_mean, policy_gradient_loss, truncated_importance_weights
from .divergences import generalized_jsd, streamed_divergence
from .gkd import gkd_loss
from .opd import reverse_kl_advantages
from .sft import sft_loss

__all__ = [
    "discounted_cumsum",
    "generalized_jsd",
    "gkd_loss",
    "masked_mean",
    "policy_gradient_loss",
    "reverse_kl_advantages",
    "sft_loss",
    "streamed_divergence",
    "truncated_importance_weights",
]
