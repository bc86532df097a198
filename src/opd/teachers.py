"""Teachers turn rollouts into signals: per-token log-probs, or next-token distributions for full-vocabulary losses.

``Teacher`` is the protocol the loop and the methods use. Its next-token distributions come as
``HiddenStates`` (a local model's final hidden states and output layer, so a loss can form the
logits one chunk at a time) or as ``TopLogprobs`` (top-k ids and log-probs only, e.g. a served
teacher). ``after_optimizer_step`` lets a teacher that follows the student (EMA) update
itself; ``state_tensors`` is what a checkpoint must carry for it.

Kinds:

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
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .models import freeze as freeze_model
from .models import load_model
from .rollout import Rollouts
from .scoring import Projection, completion_hidden_states, projection, rollout_logprobs

Autocast = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class HiddenStates:
    """A teacher's next-token distributions as its final hidden states ``[B, C, H]`` and its output layer."""

    hidden_BCH: torch.Tensor
    project: Projection  # hidden_NH -> float32 logits_NV (before temperature)


@dataclass(frozen=True)
class TopLogprobs:
    """A teacher's next-token distributions known only through their top-k: ids and log-probs ``[B, C, K]``,
    log-probs over the full vocabulary at the temperature the loss uses."""

    ids_BCK: torch.Tensor
    logp_BCK: torch.Tensor
    token_logp_BC: torch.Tensor | None = None  # the log-prob of each completion token itself (at temperature 1), if known


class Teacher(Protocol):
    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        """``[B, C]`` log-probs of the rollouts' completion tokens (0 where there is no token)."""

    def distributions(self, rollouts: Rollouts) -> HiddenStates | TopLogprobs:
        """The next-token distributions at every completion position."""

    def after_optimizer_step(self, student: torch.nn.Module) -> None:
        """Called after every applied optimizer step."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """State a checkpoint must carry for an exact resume (empty for a stateless teacher)."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned."""


class StatelessTeacher:
    """The hooks of a teacher that does not follow the student: nothing to update, nothing to checkpoint."""

    def after_optimizer_step(self, student: torch.nn.Module) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


class ModelTeacher(StatelessTeacher):
    """A causal LM scored without autograd.

    ``token_logprobs`` gives ``[B, C]`` log-probs of the rollouts' completion tokens (no
    logits kept); ``distributions`` gives hidden states + output layer, so a full-vocabulary
    loss forms teacher logits one chunk of tokens at a time.
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

    def distributions(self, rollouts: Rollouts) -> HiddenStates:
        with self._scoring():
            return HiddenStates(completion_hidden_states(self.model, rollouts), self.project)


class EmaTeacher(ModelTeacher):
    """θ_T ← d·θ_T + (1-d)·θ after every applied optimizer step; starts at the student's initial weights."""

    def __init__(self, student: torch.nn.Module, decay: float, autocast: Autocast | None = None):
        super().__init__(copy.deepcopy(student), autocast, freeze=True)
        self.decay = decay
        self._pairs = [
            (p_ema, p) for (name, p_ema), (_, p) in zip(self.model.named_parameters(), student.named_parameters()) if p.requires_grad
        ]

    @torch.no_grad()
    def after_optimizer_step(self, student: torch.nn.Module) -> None:
        for p_ema, p in self._pairs:
            p_ema.lerp_(p.detach(), 1 - self.decay)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": p.detach().cpu().contiguous() for i, (p, _) in enumerate(self._pairs)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, (p, _) in enumerate(self._pairs):
                p.copy_(tensors[f"ema.{i}"])


class RoutedTeacher(StatelessTeacher):
    """Per-example routing to one of several teachers (multi-teacher ExOPD); rows without a route use ``default``.

    Sampled-token log-probs only: the methods that accept routes (``Needs.routable``) use nothing else.
    """

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

    def distributions(self, rollouts: Rollouts) -> HiddenStates:
        raise TypeError("routed teachers give sampled-token log-probs only, not full next-token distributions")


def initial_student(student_cfg, student: torch.nn.Module, autocast: Autocast | None, device) -> ModelTeacher:
    """The student's initial weights (``student_cfg``: the run's ``student`` section): with LoRA the student
    with its adapters disabled, else a frozen copy loaded again from its checkpoint."""
    if student_cfg.lora.enabled:
        return ModelTeacher(student, autocast, freeze=False, disable_adapters=True)
    model = load_model(student_cfg.path, "student.path", student_cfg.dtype, student_cfg.trust_remote_code, device)
    return ModelTeacher(model, autocast)
