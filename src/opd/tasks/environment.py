"""A user's own environment, named by import path: ``task.name=environment``.

``task.environment: mypackage.envs:Calculator`` names a class (``module:Class`` or ``module.Class``)
that is built once per example as ``Class(row, **task.environment_kwargs)`` — ``row`` being the
example's JSON object from ``task.rows`` — and follows ``episodes.environments.Environment``: ``start()`` (the
initial messages), ``tools()`` (JSON schemas for the chat template, [] for none) and
``step(assistant_text) -> StepResult``. Every batch and every evaluation is then a batch of its
episodes; a row's ``answer`` field, when it has one, marks it graded for accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config.objects import import_object
from ..config.sections import ConfigError, require
from ..episodes.environments import Environment, EpisodeLimits, EpisodicTask
from .base import Example, RewardsOneByOne, TaskConfig, episodes_lack, register_task
from .rows import DataError, read_rows
from .splits import FixedSplits


@dataclass
class EnvironmentConfig(TaskConfig):
    environment: str | None = None  # import path of the environment class: "module:Class" or "module.Class"
    environment_kwargs: dict = field(default_factory=dict)  # keyword arguments for each construction
    rows: str | None = None  # JSONL / JSON / Parquet of example objects (each given to the class)
    eval_rows: str | None = None  # held-out examples; None = hold out task.eval_size rows
    max_turns: int = 4
    max_tokens: int = 1024  # completion tokens per episode, the model's and the observations'
    stop: list[str] = field(default_factory=lambda: ["</tool_call>"])  # a turn also ends at these strings

    def validate(self, cfg: Any) -> None:
        require(self.environment is not None, "task.environment", "must name the environment class (module:Class) for task.name=environment")
        require(self.rows is not None, "task.rows", "is required for task.name=environment (a JSONL of example objects)")
        require(self.max_turns >= 1, "task.max_turns", f"must be >= 1, got {self.max_turns}")
        require(all(isinstance(x, str) and x for x in self.stop), "task.stop", f"must be a list of non-empty strings, got {self.stop!r}")
        require(self.max_tokens >= cfg.sampling.max_new_tokens, "task.max_tokens", f"must be at least sampling.max_new_tokens ({cfg.sampling.max_new_tokens}), got {self.max_tokens}")
        require(
            self.reward_function is None, "task.reward_function",
            "does not apply to task.name=environment: an environment's rewards are its own (StepResult.reward from step()); compute it there",
        )
        environment_class(self.environment)

    def completion_budget(self, max_new_tokens: int) -> int:
        return self.max_tokens  # an episode's agent and observation tokens

    def unsupported(self, needs) -> str | None:
        return episodes_lack(needs, "task.name=environment")


def environment_class(path: str) -> type:
    """The class an import path names; a ``ConfigError`` naming ``task.environment`` when it cannot be had."""
    found = import_object(path, "task.environment")  # a module:Class path, or a class given to the Python API
    missing = [m for m in ("start", "tools", "step") if not callable(getattr(found, m, None))]
    if missing:
        raise ConfigError(f"config key 'task.environment' names {path!r}, which lacks the Environment method(s) {', '.join(missing)}")
    return found


def read_objects(path: str) -> list[Example]:
    examples = []
    for where, row in read_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: an example must be a JSON object")
        answer = row.get("answer")
        examples.append(Example(str(row.get("prompt", where)), None if answer is None else str(answer), meta={"source": where, "row": row}))
    if not examples:
        raise DataError(f"'{path}' holds no examples")
    return examples


@register_task("environment", EnvironmentConfig)
class EnvironmentTask(RewardsOneByOne, FixedSplits, EpisodicTask):
    name = "environment"

    def __init__(self, config: EnvironmentConfig, seed: int = 0):
        self.config = config
        self._class = environment_class(config.environment)
        self.load_splits(read_objects, config.rows, config.eval_rows, config.eval_size, seed)

    @classmethod
    def from_config(cls, config: EnvironmentConfig, seed: int = 0) -> "EnvironmentTask":
        return cls(config, seed)

    def environment(self, example: Example) -> Environment:
        return self._class(example.meta["row"], **self.config.environment_kwargs)

    def episode_limits(self) -> EpisodeLimits:
        c = self.config
        return EpisodeLimits(max_turns=c.max_turns, max_tokens=c.max_tokens, stop=tuple(c.stop))

    def messages(self, example: Example) -> list[dict]:
        return list(self.environment(example).start())

    def reward(self, completion: str, example: Example) -> float:
        """A one-turn reply graded by a fresh environment (episodes are graded by their own)."""
        env = self.environment(example)
        env.start()
        result = env.step(completion)
        return float(result.reward) if result.done else 0.0

    def privileged_messages(self, example: Example) -> list[dict]:
        raise DataError("task.name=environment has no privileged view")

    def step_judge(self) -> None:
        return None
