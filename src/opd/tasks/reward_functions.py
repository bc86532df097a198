"""Users' own reward functions (``task.reward_function``), TRL's ``reward_funcs`` for opd.

``task.reward_function: my_rewards:formatted`` (or a list of them, with ``task.reward_weights``) names
functions importable from where opd runs, each called as ``fn(completion, row) -> float``: the
completion's text (special tokens stripped) and the example's row — the JSON object it was read from,
or for the embedded arithmetic task ``{"prompt", "answer", "solution"}``. The reward is the weighted
sum. It replaces the task's own grader everywhere the task is asked for a reward: the methods that
train on rewards (GRPO, OVD, OPD with a task reward, REOPOLD), the search world's episodes, and
evaluation, where every row is then graded and a reward that is not 0 or 1 is reported as ``reward``
rather than ``accuracy`` (docs/data.md).

A name that cannot be imported, or is not callable, is a one-line ``ConfigError`` before any model
loads. A function that raises stops the run naming the function and the row (``task.reward_errors:
stop``, the default), or scores 0 and is counted (``zero``: the first is logged, and ``summary.json``'s
``reward_errors`` counts them over all ranks).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..config.objects import import_object
from ..config.sections import ConfigError
from .base import TaskConfig, build_task

if TYPE_CHECKING:
    from .base import Example, Task

log = logging.getLogger(__name__)


class RewardFunctionError(RuntimeError):
    """A user's reward function raised, or returned something that is not a finite number."""


def import_function(path: str, key: str) -> Callable:
    """The function ``path`` names (``config.objects.import_object``); a ``ConfigError`` naming ``key`` otherwise."""
    fn = import_object(path, key)
    if not callable(fn):
        raise ConfigError(f"config key '{key}': {path!r} is a {type(fn).__name__}, not a function")
    return fn


def function_paths(spec: str | list[str] | None) -> list[str]:
    return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)


def load_reward_functions(spec: str | list[str] | None, weights: list[float] | None) -> list[tuple[str, Callable, float]]:
    """``(path, function, weight)`` of each function ``task.reward_function`` names (weights 1 unless given)."""
    paths = function_paths(spec)
    if weights is not None and len(weights) != len(paths):
        raise ConfigError(f"config key 'task.reward_weights' has {len(weights)} weights for {len(paths)} reward functions")
    if weights is not None and not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"config key 'task.reward_weights' must be finite numbers, got {weights!r}")
    return [(path, import_function(path, "task.reward_function"), 1.0 if weights is None else float(w))
            for path, w in zip(paths, weights or [None] * len(paths))]


def example_row(example: Example) -> dict[str, Any]:
    """The row a reward function is given: the example's own JSON object, else its prompt, answer and solution."""
    row = example.meta.get("row")
    return dict(row) if isinstance(row, dict) else {"prompt": example.prompt, "answer": example.answer, "solution": example.solution}


def example_where(example: Example) -> str:
    """Where a row came from, for an error about it: its file and line, else the start of its prompt."""
    return example.meta.get("source", repr(example.prompt[:40]))


@dataclass
class RewardFunctions:
    """A task's reward replaced by the weighted sum of the user's functions (``Task.reward``'s signature)."""

    functions: list[tuple[str, Callable, float]]
    on_error: str = "stop"  # stop | zero
    errors: int = 0  # calls that raised and scored 0 (on_error = "zero")

    def __call__(self, completion: str, example: Example) -> float:
        row = example_row(example)
        total = 0.0
        for path, fn, weight in self.functions:
            try:
                value = fn(completion, row)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise RewardFunctionError(f"returned {value!r}, not a finite number")
            except Exception as err:  # noqa: BLE001 - the user's code: any error is named with its row
                where = example_where(example)
                if self.on_error == "stop":
                    raise RewardFunctionError(
                        f"task.reward_function {path} raised on {where}: {type(err).__name__}: {err} "
                        "(task.reward_errors=zero scores such calls 0 and counts them)"
                    ) from err
                self.errors += 1
                if self.errors == 1:
                    log.warning("task.reward_function %s raised on %s (%s: %s); scored 0, and further errors are counted",
                                path, where, type(err).__name__, err)
                value = 0.0
            total += weight * float(value)
        return total


def build_graded_task(config: TaskConfig, seed: int = 0) -> Task:
    """The task a ``task`` section describes, its reward replaced by the user's ``task.reward_function`` where one is
    named (every part of opd that asks the task for a reward then gets theirs)."""
    task = build_task(config, seed)
    functions = load_reward_functions(config.reward_function, config.reward_weights)
    if functions:
        task.reward = reward = RewardFunctions(functions, config.reward_errors)
        task.rewards = lambda completions, examples: ([reward(c, e) for c, e in zip(completions, examples)], {})
    return task


def reward_errors(task) -> int | None:
    """How many reward-function calls of ``task`` raised and scored 0; None when it grades with its own reward."""
    return task.reward.errors if isinstance(task.reward, RewardFunctions) else None


def grades_every_row(task) -> bool:
    """Whether ``task``'s rewards come from the user's functions, which grade rows with or without an answer."""
    return isinstance(task.reward, RewardFunctions)
