"""Teachers that are local models: a separate checkpoint, the student's own weights, an EMA of them.

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

from ..models.loading import freeze as freeze_model
from ..models.loading import load_model
from ..models.rollouts import Rollouts
from ..models.scoring import completion_hidden_states, projection, rollout_logprobs
from .base import HiddenStates, StatelessTeacher

Autocast = Callable[[], contextlib.AbstractContextManager]


class ModelTeacher(StatelessTeacher):
    """A causal LM scored without autograd.

    ``token_logprobs`` gives ``[B, C]`` log-probs of the rollouts' completion tokens (no
    logits kept); ``distributions`` gives hidden states + output layer, so a full-vocabulary
    loss forms teacher logits one chunk of tokens at a time. The model may sit on another device
    than the rollouts (``teacher.device``): they are scored there and the results come back to the
    rollouts' device (the projection of each chunk too). ``packed``: rows scored as one sequence
    (``train.packing``; ``models.scoring.completion_hidden_states``).
    """

    def __init__(
        self, model: torch.nn.Module, autocast: Autocast | None = None, freeze: bool = True, disable_adapters: bool = False,
        packed: bool = False,
    ):
        if disable_adapters and not hasattr(model, "disable_adapter"):
            raise TypeError("disable_adapters=True needs a peft model")
        self.model = freeze_model(model) if freeze else model
        self.device = next(self.model.parameters()).device
        self._project = projection(self.model)
        self._autocast = autocast or contextlib.nullcontext
        self._disable_adapters = disable_adapters
        self.packed = packed

    def project(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        """hidden → float32 logits through the teacher's output layer, on the device ``hidden_NH`` is on."""
        return self._project(hidden_NH.to(self.device)).to(hidden_NH.device)

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
            logp_BC, _ = rollout_logprobs(self.model, rollouts.to(self.device), temperature, packed=self.packed)
        return logp_BC.to(rollouts.completion_ids_BC.device)

    def distributions(self, rollouts: Rollouts) -> HiddenStates:
        with self._scoring():
            hidden_BCH = completion_hidden_states(self.model, rollouts.to(self.device), self.packed)
        return HiddenStates(hidden_BCH.to(rollouts.completion_ids_BC.device), self.project)


class EmaTeacher(ModelTeacher):
    """θ_T ← d·θ_T + (1-d)·θ after every applied optimizer step; starts at the student's initial weights."""

    def __init__(self, student: torch.nn.Module, decay: float, autocast: Autocast | None = None, packed: bool = False):
        super().__init__(copy.deepcopy(student), autocast, freeze=True, packed=packed)
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


def initial_student(student_cfg, student: torch.nn.Module, autocast: Autocast | None, device, packed: bool = False) -> ModelTeacher:
    """The student's initial weights (``student_cfg``: the run's ``student`` section): with LoRA the student
    with its adapters disabled (on the student's device), else a frozen copy loaded again from its checkpoint
    onto ``device``."""
    if student_cfg.lora.enabled:
        return ModelTeacher(student, autocast, freeze=False, disable_adapters=True, packed=packed)
    model = load_model(student_cfg.path, "student.path", student_cfg.dtype, student_cfg.trust_remote_code, device, student_cfg.attn_implementation)
    return ModelTeacher(model, autocast, packed=packed)
