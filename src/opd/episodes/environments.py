"""Environments: what answers each assistant turn of an episode, and what a task of episodes gives the driver.

An ``Environment`` starts from an example (the initial messages, and the tools it offers) and answers
each assistant turn with a ``StepResult``: observation messages (tool results), a reward and whether
the episode is done. ``OneTurn`` makes a single-turn task an environment; ``ToolEnvironment`` runs
the Hermes / Qwen tool calls of a turn and grades the turn that calls none.

A task whose examples are episodes subclasses ``EpisodicTask``: one environment per example
(``environment``) and the episode's limits (``episode_limits``). That declaration is how the loop,
the evaluation and the methods know a task is episodic (``is_episodic``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from .tool_calls import CLOSE, Tool, parse_tool_calls, run_call


@dataclass
class StepResult:
    observations: list[dict] = field(default_factory=list)  # messages after the turn (role "tool"); none when done
    reward: float = 0.0
    done: bool = False
    tool_calls: int = 0  # calls run in this turn
    failed_calls: int = 0  # malformed calls, unknown tools, bad arguments


class Environment(Protocol):
    def start(self) -> list[dict]:
        """The episode's initial messages."""

    def tools(self) -> list[dict]:
        """The JSON schemas of the tools it offers (passed to the chat template as ``tools=``); [] for none."""

    def step(self, assistant_text: str) -> StepResult:
        """The answer to one assistant turn."""


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4  # assistant turns per episode
    max_tokens: int = 1024  # completion tokens per episode: the agent's and the observations'
    stop: tuple[str, ...] = (CLOSE,)  # a turn also ends at these strings
    threads: int = 8  # environment steps (tool I/O) run at once


class EpisodicTask(ABC):
    """What a task of episodes gives the episode driver, declared by subclassing: an environment per example and the
    limits of an episode. (The task's other methods — ``messages``, ``reward``, … — are the ``tasks.base.Task``
    protocol's.)"""

    @abstractmethod
    def environment(self, example) -> Environment:
        """A fresh environment for one example (an episode)."""

    @abstractmethod
    def episode_limits(self) -> EpisodeLimits:
        """Turns, tokens and stop strings of one episode."""


def is_episodic(task) -> bool:
    """Whether ``task``'s examples are environments (it subclasses ``EpisodicTask``) rather than single prompts."""
    return isinstance(task, EpisodicTask)


class Graded(Protocol):
    """What an environment asks of the task it stands for: the example's messages and the grade of an answer (the
    example is the task's own, passed back to it)."""

    def messages(self, example) -> list[dict]: ...

    def reward(self, completion: str, example) -> float: ...


class OneTurn:
    """A single-turn task as an environment: one reply, graded by the task."""

    def __init__(self, task: Graded, example):
        self.task, self.example = task, example

    def start(self) -> list[dict]:
        return self.task.messages(self.example)

    def tools(self) -> list[dict]:
        return []

    def step(self, assistant_text: str) -> StepResult:
        return StepResult(reward=self.task.reward(assistant_text, self.example), done=True)


class ToolEnvironment:
    """A task whose answer may take tool calls: a turn with calls gets their results (a malformed call gets what
    was wrong with it, and the episode goes on); the first turn without any is the answer, graded by the task."""

    def __init__(self, task: Graded, example, tools: Sequence[Tool]):
        self.task, self.example = task, example
        self._tools = {t.name: t for t in tools}

    def start(self) -> list[dict]:
        return self.task.messages(self.example)

    def tools(self) -> list[dict]:
        return [t.schema() for t in self._tools.values()]

    def step(self, assistant_text: str) -> StepResult:
        parsed = parse_tool_calls(assistant_text)
        if not parsed.calls and not parsed.problems:
            return StepResult(reward=self.task.reward(assistant_text, self.example), done=True)
        observations, failed = [], len(parsed.problems)
        for call in parsed.calls:
            text, ok = run_call(self._tools, call)
            failed += not ok
            observations.append({"role": "tool", "name": call.name, "content": text})
        observations += [{"role": "tool", "content": f"error: {problem}"} for problem in parsed.problems]
        return StepResult(observations, tool_calls=len(parsed.calls), failed_calls=failed)
