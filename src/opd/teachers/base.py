"""What a teacher gives the loop: per-token log-probs of sampled tokens, or next-token distributions for
full-vocabulary losses, and the hooks of a teacher that follows the student.

``Teacher`` is the protocol the loop and the methods use. Its next-token distributions come as
``HiddenStates`` (a local model's final hidden states and output layer, so a loss can form the
logits one chunk at a time) or as ``TopLogprobs`` (top-k ids and log-probs only, e.g. a served
teacher). ``after_optimizer_step`` lets a teacher that follows the student (EMA) update
itself; ``state_tensors`` is what a checkpoint must carry for it. The kinds: ``teachers.model``
(a local model, the student's own weights, an EMA), ``teachers.routed`` (one per example),
``teachers.served`` (a server); verbal judges are ``teachers.judges``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..models.rollouts import Rollouts
from ..models.scoring import Projection


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
    # it reads the student's completions as text in a tokenizer of its own and scores spans (``span_scores``,
    # ``aligned_distributions``: ``teachers.cross_tokenizer``), not the student's tokens
    reads_text: bool

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

    def take_failure(self) -> Exception | None:
        """The failure of a remote teacher since the last call (then forgotten), or None. A teacher behind a service
        that fails mid-step does not raise: it scores the step's remaining rows NaN, so that every rank's step runs
        its collectives to the end and is skipped, and the loop then stops the run at the step boundary
        (``training.loop``; docs/cluster.md)."""


class StatelessTeacher:
    """The hooks of a teacher that does not follow the student: nothing to update, nothing to checkpoint."""

    reads_text = False  # it scores the student's own tokens

    def after_optimizer_step(self, student: torch.nn.Module) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def take_failure(self) -> Exception | None:
        return None


