"""Teachers turn rollouts into signals: per-token log-probs, or hidden states for streamed full distributions."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .models import freeze
from .rollout import Rollouts
from .scoring import completion_hidden_states, projection, rollout_logprobs


class ModelTeacher:
    """A separate local HF causal LM, frozen, run without autograd.

    ``token_logprobs`` gives ``[B, C]`` log-probs of the student's tokens (no logits kept);
    ``hidden_states`` + ``project`` let a full-vocabulary loss form teacher logits one chunk
    of tokens at a time.
    """

    def __init__(self, model: torch.nn.Module, autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model = freeze(model)
        self.project = projection(self.model)
        self._autocast = autocast or contextlib.nullcontext

    @torch.no_grad()
    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        with self._autocast():
            logp_BC, _ = rollout_logprobs(self.model, rollouts, temperature)
        return logp_BC

    @torch.no_grad()
    def hidden_states(self, rollouts: Rollouts) -> torch.Tensor:
        with self._autocast():
            hidden_BCH = completion_hidden_states(self.model, rollouts)
        return hidden_BCH


class AdapterDisabledTeacher:
    """The student's initial weights without a second copy: the LoRA student with its adapters switched off."""

    def __init__(self, peft_model: torch.nn.Module, autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("AdapterDisabledTeacher needs a peft model")
        self.model = peft_model
        self._autocast = autocast or contextlib.nullcontext

    @torch.no_grad()
    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        with self.model.disable_adapter(), self._autocast():
            logp_BC, _ = rollout_logprobs(self.model, rollouts, temperature)
        return logp_BC
