"""What a task gives the loop — prompts, privileged context, a verifier — and the registry of tasks by name.

A task is one module in ``tasks/`` that defines a config dataclass (a ``TaskConfig``: the
fields of the ``task`` section when ``task.name`` names it) and a class following the
``Task`` protocol, and registers both with ``@register_task``. The package imports every
module in it, so adding a task touches only its own file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Protocol, Sequence

from ..config.sections import Registry


@dataclass(frozen=True)
class Example:
    """One problem.

    ``prompt`` is the user message the student sees; ``answer`` is what the verifier checks
    against (None for prompt-only data); ``solution`` is a reference completion (privileged
    context for self-distillation, the target for SFT), or None where the data has none.
    """

    prompt: str
    answer: str | None
    solution: str | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    # the prompt as chat turns, for data that comes as a conversation (else the task builds them from ``prompt``)
    messages: tuple[dict, ...] | None = field(default=None, hash=False, compare=False)

    def turns(self) -> list[dict]:
        """The example's own prompt turns (copies): its conversation, or ``prompt`` as one user turn."""
        return [dict(m) for m in self.messages] if self.messages else [{"role": "user", "content": self.prompt}]


class Judge(Protocol):
    """A verbal judge (OVD's teacher): a score in [0, 9] per completion. Implementations: a task's own step checker
    (``Task.step_judge``), and a local model or an HTTP endpoint (``teachers.judges``)."""

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> list[float]: ...


class StepJudge(Judge, Protocol):
    """A judge that also scores each step of a single-turn completion (0–9 each), and says where each step begins."""

    def step_scores(self, example: Example, completion: str) -> list[float]: ...

    def step_starts(self, example: Example, completion: str) -> list[int]:
        """Where each scored step begins in ``completion`` (for a step it lacks: where it would begin)."""


class TurnJudge(Protocol):
    """A judge of multi-turn episodes: a score (0–9) per agent turn, and one for the whole episode."""

    def turn_scores(self, example: Example, turns: list[str]) -> list[float]:
        """Each agent turn's score, the turns as their environment read them."""

    def episode_score(self, example: Example, turns: list[str]) -> float:
        """The episode's score."""


class Task(Protocol):
    name: str

    def sample_train(self, n: int, rng: random.Random) -> list[Example]:
        """``n`` training examples drawn with ``rng`` (the loop owns and checkpoints ``rng``)."""

    def eval_examples(self) -> list[Example]:
        """The held-out split, fixed for the task's configuration."""

    def reward(self, completion: str, example: Example) -> float:
        """1.0 for a correct completion, 0.0 otherwise (partial credit allowed)."""

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[list[float], dict[str, float]]:
        """Each completion's ``reward`` — all at once, so that a task that runs programs runs them in parallel — and
        what grading them counted, as metrics of the step (e.g. why programs failed); ``RewardsOneByOne`` gives it
        from ``reward``."""

    def messages(self, example: Example) -> list[dict]:
        """The chat messages the student is prompted with."""

    def privileged_messages(self, example: Example) -> list[dict]:
        """The chat messages a privileged-context teacher is prompted with."""

    def step_judge(self) -> StepJudge | TurnJudge | None:
        """A programmatic judge of each step (of each turn, for a task of episodes), for tasks whose steps can be
        checked; None otherwise."""

    def eval_metrics(self, example: Example, completion: str, reward: float) -> dict[str, float]:
        """The held-out measures this task reports for one example beside its reward (``reward``) — e.g. token F1 of a
        short answer — averaged over the evaluated rows; {} for none. ``completion``: its reply (an episode's last)."""

    def describe_eval(self) -> dict:
        """What the held-out split is: ``{"source": <where its rows come from>, "rows": <how many>}``."""

    def splits(self) -> dict[str, list[Example]]:
        """The task's fixed example lists by name ("train", "eval"), for the pre-flight pass; a split drawn
        afresh (the arithmetic task's training problems) is absent."""

    def filter_split(self, name: str, keep: Callable[[Example], Example | None]) -> None:
        """Replace split ``name`` by ``keep`` of each example, dropping those it maps to None."""


class RewardsOneByOne:
    """``Task.rewards`` as ``reward`` of each completion in turn, counting nothing (a task with nothing to run)."""

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[list[float], dict[str, float]]:
        return [self.reward(c, e) for c, e in zip(completions, examples)], {}


def episodes_lack(needs: Any, task: str) -> str | None:
    """What a method needs that a task of episodes does not give (its samples are whole episodes; there are no
    reference solutions, privileged view or verbal judge over them yet), in words; None when nothing."""
    for needed, what in ((needs.solutions, "reference solutions"), (needs.privileged, "a privileged view"), (needs.judge, "a verbal judge")):
        if needed:
            return f"needs {what}, which {task} does not give yet"
    return None


@dataclass
class TaskConfig:
    """The ``task`` section: ``name`` picks the registered task, whose config class adds its own fields."""

    name: str = ""
    eval_size: int | None = 256
    # extra arguments to the tokenizer's chat template (e.g. {enable_thinking: false} for Qwen3)
    chat_template_kwargs: dict = field(default_factory=dict)
    # a prompt longer than the context leaves (context − max new tokens), found by the pre-flight pass before any
    # model work: "skip" the row (counted and printed), "truncate" it (keep its last tokens), or stop with an "error"
    too_long: Literal["error", "skip", "truncate"] = "skip"
    # the user's reward: module:function (or a list), called as fn(completion, row) -> float, replacing the task's
    # grader in training and evaluation (tasks/reward_functions.py); weights for a list; what a raising call does
    reward_function: str | list[str] | None = None
    reward_weights: list[float] | None = None
    reward_errors: Literal["stop", "zero"] = "stop"

    # whether the task's examples can be checked step by step (Task.step_judge returns a judge)
    has_step_judge: ClassVar[bool] = False

    def validate(self, cfg: Any) -> None:
        """Refuse this section's values, and combinations with the rest of ``cfg`` (the whole run config)."""

    def unsupported(self, needs: Any) -> str | None:
        """What of a method's ``Needs`` this task cannot give, in words ("needs …"), or None."""
        return None

    def missing_solutions_key(self) -> str | None:
        """None when every example carries a reference solution; else the key that would give them one."""
        return None

    def completion_budget(self, max_new_tokens: int) -> int:
        """The most completion tokens a row of this task can hold, given ``sampling.max_new_tokens``: one completion's
        (the default), or a whole episode's for a task of episodes (its agent and observation tokens)."""
        return max_new_tokens


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config_class: type[TaskConfig]
    task_class: type  # a class following ``Task`` (an ``episodes.environments.EpisodicTask`` for a task of episodes)

    def build(self, config: TaskConfig, seed: int = 0) -> Task:
        return self.task_class.from_config(config, seed)


TASK_REGISTRY = Registry("task.name", "task")  # name -> TaskSpec


def register_task(name: str, config_class: type[TaskConfig]):
    """Class decorator: the task class (with a ``from_config(config, seed)`` classmethod) under ``name``."""

    def decorate(cls):
        TASK_REGISTRY.add(name, TaskSpec(name, config_class, cls))
        return cls

    return decorate


def build_task(config: TaskConfig, seed: int = 0) -> Task:
    """The task a ``task`` section describes, graded by its own reward (``tasks.reward_functions.build_graded_task``
    adds the user's reward functions)."""
    return TASK_REGISTRY[config.name].build(config, seed)
