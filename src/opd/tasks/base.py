"""What a task gives the loop: prompts, privileged context, a verifier."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Example:
    """One problem.

    ``prompt`` is the user message the student sees; ``answer`` is what the verifier checks
    against; ``solution`` is a reference completion (privileged context for self-distillation,
    the target for SFT), or None where the data has none.
    """

    prompt: str
    answer: str
    solution: str | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)


class Task(Protocol):
    name: str

    def sample_train(self, n: int, rng: random.Random) -> list[Example]:
        """``n`` training examples drawn with ``rng`` (the loop owns and checkpoints ``rng``)."""

    def eval_examples(self) -> list[Example]:
        """The held-out split, fixed for the task's configuration."""

    def reward(self, completion: str, example: Example) -> float:
        """1.0 for a correct completion, 0.0 otherwise (partial credit allowed)."""

    def messages(self, example: Example) -> list[dict]:
        """The chat messages the student is prompted with."""

    def privileged_messages(self, example: Example) -> list[dict]:
        """The chat messages a privileged-context teacher is prompted with."""
