"""Teachers turn rollouts into signals: per-token log-probs, or hidden states for streamed full distributions.

Kinds, all behind the same two methods:

- ``ModelTeacher(model)``: a separate frozen HF model (a teacher, a reference, a frozen
  copy of the student's initial weights).
- ``ModelTeacher(student, freeze=False)``: the student's *current* weights, scored without
  gradients (self-distillation with ``teacher_weights=current``).
- ``ModelTeacher(peft_student, freeze=False, disable_adapters=True)``: the student's
  initial weights without a second copy — the LoRA student with its adapters switched off.
- ``EmaTeacher(student)``: an exponential moving average of the student's weights.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch

from .models import freeze as freeze_model
from .rollout import Rollouts
from .scoring import completion_hidden_states, projection, rollout_logprobs

Autocast = Callable[[], contextlib.AbstractContextManager]


class ModelTeacher:
    """A causal LM scored without autograd.

    ``token_logprobs`` gives ``[B, C]`` log-probs of the rollouts' completion tokens (no
    logits kept); ``hidden_states`` + ``project`` let a full-vocabulary loss form teacher
    logits one chunk of tokens at a time.
    """

    def __init__(self, model: torch.nn.Module, autocast: Autocast | None = None, freeze: bool = True, disable_adapters: bool = False):
        if disable_adapters and not hasattr(model, "disable_adapter"):
            raise TypeError("disable_adapters=True needs a peft model")
        self.model = freeze_model(model) if freeze else model
        self.project = projection(self.model)
        self._autocast = autocast or contextlib.nullcontext
        self._disable_adapters = disable_adapters

    @contextlib.contextmanager
    def _scoring(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self._disable_adapters:
                stack.enter_context(self.model.disable_adapter())
            stack.enter_context(self._autocast())
            yield

    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        with self._scoring():
            logp_BC, _ = rollout_logprobs(self.model, rollouts, temperature)
        return logp_BC

    def hidden_states(self, rollouts: Rollouts) -> torch.Tensor:
        with self._scoring():
            return completion_hidden_states(self.model, rollouts)


class EmaTeacher(ModelTeacher):
    """θ_T ← d·θ_T + (1-d)·θ after every applied optimizer step; starts at the student's initial weights."""

    def __init__(self, student: torch.nn.Module, decay: float, autocast: Autocast | None = None):
        super().__init__(copy.deepcopy(student), autocast, freeze=True)
        self.decay = decay
        self._pairs = [
            (p_ema, p) for (name, p_ema), (_, p) in zip(self.model.named_parameters(), student.named_parameters()) if p.requires_grad
        ]

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        for p_ema, p in self._pairs:
            p_ema.lerp_(p.detach(), 1 - self.decay)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": p.detach().cpu().contiguous() for i, (p, _) in enumerate(self._pairs)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, (p, _) in enumerate(self._pairs):
                p.copy_(tensors[f"ema.{i}"])


class RoutedTeacher:
    """Per-example routing to one of several teachers (multi-teacher ExOPD); rows without a route use ``default``."""

    def __init__(self, routes: dict[str, ModelTeacher], default: ModelTeacher | None = None):
        self.routes = routes
        self.default = default

    def _teacher(self, route: str | None) -> ModelTeacher:
        if route is None:
            if self.default is None:
                raise ValueError("an example names no teacher route and teacher.path (the default teacher) is not set")
            return self.default
        if route not in self.routes:
            raise ValueError(f"an example routes to teacher '{route}' but teacher.routes has: {', '.join(sorted(self.routes))}")
        return self.routes[route]

    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        routes = rollouts.route_B or [None] * rollouts.batch_size
        logp_BC = torch.zeros(rollouts.completion_ids_BC.shape, dtype=torch.float32, device=rollouts.completion_ids_BC.device)
        for route in dict.fromkeys(routes):
            rows = [i for i, r in enumerate(routes) if r == route]
            logp_BC[rows] = self._teacher(route).token_logprobs(rollouts.select(rows), temperature).to(logp_BC.dtype)
        return logp_BC
