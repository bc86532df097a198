"""Multi-turn episodes: environments that answer each assistant turn, and the driver that samples them.

An ``Environment`` starts from an example (the initial messages, and the tools it offers) and answers
each assistant turn with a ``StepResult``: observation messages (tool results), a reward and whether
the episode is done. ``OneTurn`` makes today's single-turn tasks environments; ``ToolEnvironment``
runs the Hermes / Qwen tool calls of a turn and grades the turn that calls none.

``run_episodes`` drives a batch of environments turn by turn: every live row is sampled together,
each turn ending at EOS or at a stop string (``</tool_call>``); the environments' steps (tool I/O) run
in a thread pool; observations are rendered with the chat template's tool role and their tokens
appended. **Token ids are the source of truth**: a row's ids only ever grow — what was sampled is
never re-tokenised. What is appended after a reply is what the template renders after that reply's
text: the conversation is rendered with a marker in the reply's place, and the text after the marker
(the turn's closing, the tool messages, the next generation prompt) is tokenised. So a template that
renders earlier turns differently later (Qwen3 drops earlier reasoning) still extends the ids the
model saw; one that does not render the reply verbatim is refused (``EpisodeError``), as nothing
after it can be located. The whole episode becomes one ``Rollouts`` row: its completion is every
agent and observation token, its ``loss_mask_BC`` is 1 on the agent's sampled tokens only, so a
teacher scores the agent's tokens with the observations in its context and every loss trains on the
agent's tokens alone. ``max_turns``, ``max_tokens`` (agent + observation tokens) and the model's
context (``context``: prompt + completion) bound an episode.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

from .prompts import prompt_ids, render_prompt
from .rollout import Rollouts, Sampler, left_pad, right_pad
from .sections import SamplingConfig
from .tool_calls import CLOSE, Tool, parse_tool_calls, run_call

if TYPE_CHECKING:  # the tasks package imports the episodic tasks, which import this module
    from .tasks.base import Example, Task


class EpisodeError(ValueError):
    """An episode that cannot be continued as token ids (e.g. a chat template that rewrites earlier turns)."""


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


class OneTurn:
    """A single-turn task as an environment: one reply, graded by the task."""

    def __init__(self, task: Task, example: Example):
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

    def __init__(self, task: Task, example: Example, tools: Sequence[Tool]):
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


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4  # assistant turns per episode
    max_tokens: int = 1024  # completion tokens per episode: the agent's and the observations'
    stop: tuple[str, ...] = (CLOSE,)  # a turn also ends at these strings
    threads: int = 8  # environment steps (tool I/O) run at once


@dataclass
class Episodes:
    rollouts: Rollouts  # one row per episode; loss_mask_BC is 1 on the agent's sampled tokens only
    rewards: list[float]
    turns: list[int]
    tool_calls: list[int]
    failed_calls: list[int]
    cut: list[str | None]  # "max_turns" / "max_tokens" (or the context) where a limit ended the episode, else None
    messages: list[list[dict]]  # each episode's conversation

    def metrics(self) -> dict[str, float]:
        n = max(len(self.rewards), 1)
        return {
            "episode_turns": sum(self.turns) / n,
            "episode_tool_calls": sum(self.tool_calls) / n,
            "episode_failed_calls": sum(self.failed_calls) / n,
            "episode_cut_fraction": sum(c is not None for c in self.cut) / n,
        }


@dataclass
class _Row:
    env: Environment
    messages: list[dict]
    tools: list[dict]
    prompt_ids: list[int]
    budget: int = 0  # completion tokens this episode may have (task.max_tokens, or less where the context ends first)
    ids: list[int] = field(default_factory=list)  # completion: agent and observation tokens
    trained: list[int] = field(default_factory=list)  # 1 on the agent's sampled tokens
    logps: list[float] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    failed_calls: int = 0
    cut: str | None = None
    done: bool = False


def run_episodes(
    envs: Sequence[Environment],
    sampler: Sampler,
    tokenizer,
    params: SamplingConfig,
    limits: EpisodeLimits,
    generator: torch.Generator | None = None,
    template_kwargs: dict | None = None,
    eos_token_ids: Sequence[int] | None = None,
    context: int | None = None,
) -> Episodes:
    """Run every environment to the end (or a limit), sampling all live rows of a turn together (``eos_token_ids``:
    the ids that end a turn, as given to the sampler, default the tokenizer's EOS; ``context``: the model's, which
    no row's prompt + completion may pass)."""
    eos = set(eos_token_ids or [tokenizer.eos_token_id])
    rows = []
    for env in envs:
        messages, tools = list(env.start()), env.tools()
        row = _Row(env, messages, tools, prompt_ids(tokenizer, messages, template_kwargs_with_tools(template_kwargs, tools)))
        row.budget = min(limits.max_tokens, context - len(row.prompt_ids)) if context else limits.max_tokens
        if row.budget <= 0:
            row.done, row.cut = True, "context"
        rows.append(row)
    with ThreadPoolExecutor(max_workers=max(1, limits.threads)) as pool:
        for _ in range(limits.max_turns):
            live = [r for r in rows if not r.done]
            if not live:
                break
            room = max(r.budget - len(r.ids) for r in live)
            turn = sampler.sample([r.prompt_ids + r.ids for r in live], replace(params, max_new_tokens=min(params.max_new_tokens, room)), generator, limits.stop)
            replies = []
            for j, row in enumerate(live):
                n = int(turn.completion_mask_BC[j].sum())
                new_ids = turn.completion_ids_BC[j, :n].tolist()[: row.budget - len(row.ids)]
                logps = turn.sampler_logp_BC[j, : len(new_ids)].tolist() if turn.sampler_logp_BC is not None else [0.0] * len(new_ids)
                ended_eos = bool(new_ids) and new_ids[-1] in eos
                row.ids += new_ids
                row.trained += [1] * len(new_ids)
                row.logps += logps
                row.turns += 1
                if len(new_ids) < n:
                    row.cut = _limit(row, limits)
                # the reply as text, special tokens kept (a template's tool-call tags may be special), its EOS not
                reply = tokenizer.decode(new_ids[:-1] if ended_eos else new_ids, skip_special_tokens=False)
                row.messages.append({"role": "assistant", "content": reply})
                replies.append((row, reply, ended_eos))
            results = list(pool.map(lambda item: item[0].env.step(item[1]), replies))
            for (row, reply, ended_eos), result in zip(replies, results):
                row.tool_calls += result.tool_calls
                row.failed_calls += result.failed_calls
                row.reward = result.reward
                if result.done or row.cut:
                    row.done = True
                else:
                    _append_observations(tokenizer, row, ended_eos, result.observations, template_kwargs, limits)
        for row in rows:
            if not row.done:
                row.done, row.cut = True, "max_turns"
    return _episodes(rows, tokenizer)


def _limit(row: "_Row", limits: EpisodeLimits) -> str:
    return "max_tokens" if row.budget == limits.max_tokens else "context"


MARK = "\u2063opd-reply\u2063"  # stands in for the reply when the template renders what follows it


def template_kwargs_with_tools(template_kwargs: dict | None, tools: list[dict]) -> dict:
    """The chat template's extra arguments with an episode's tool schemas (``tools=``) when it has any."""
    return {**(template_kwargs or {}), **({"tools": tools} if tools else {})}


def _append_observations(tokenizer, row: _Row, ended_eos: bool, observations: list[dict], template_kwargs, limits: EpisodeLimits) -> None:
    """Append, untrained, the tokens the template puts after this turn's reply: the turn's closing (unless the
    model sampled it), the observations and the next generation prompt."""
    marked = row.messages[:-1] + [{"role": "assistant", "content": MARK}] + observations
    rendered = render_prompt(tokenizer, marked, template_kwargs_with_tools(template_kwargs, row.tools))
    if rendered.count(MARK) != 1:
        raise EpisodeError(
            f"the chat template does not render an assistant reply as it is (turn {row.turns}), so what follows the reply "
            "cannot be found; use a template that renders assistant content verbatim"
        )
    between = rendered[rendered.index(MARK) + len(MARK) :]
    if ended_eos:  # the model sampled the turn's closing itself: only what follows it is appended
        eos_text = tokenizer.decode(row.ids[-1:], skip_special_tokens=False)
        if between.startswith(eos_text):
            between = between[len(eos_text) :]
    row.messages += observations
    new_ids = tokenizer(between, add_special_tokens=False)["input_ids"]
    if len(row.ids) + len(new_ids) >= row.budget:  # no room left for another reply
        new_ids = new_ids[: row.budget - len(row.ids)]
        row.done, row.cut = True, _limit(row, limits)
    row.ids += new_ids
    row.trained += [0] * len(new_ids)
    row.logps += [0.0] * len(new_ids)


def _episodes(rows: list[_Row], tokenizer) -> Episodes:
    pad = tokenizer.pad_token_id
    prompt_ids_BP, prompt_mask_BP = left_pad([r.prompt_ids for r in rows], pad)
    completion_ids, completion_mask = right_pad([r.ids for r in rows], pad)
    trained, _ = right_pad([r.trained for r in rows], 0)
    logp = torch.zeros(completion_ids.shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        logp[i, : len(r.logps)] = torch.tensor(r.logps, dtype=torch.float32)
    rollouts = Rollouts(
        prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP, completion_ids_BC=completion_ids, completion_mask_BC=completion_mask,
        loss_mask_BC=trained, sampler_logp_BC=logp, texts=[tokenizer.decode(r.ids, skip_special_tokens=True) for r in rows],
        group_B=list(range(len(rows))),
    )
    return Episodes(
        rollouts, [r.reward for r in rows], [r.turns for r in rows], [r.tool_calls for r in rows], [r.failed_calls for r in rows],
        [r.cut for r in rows], [r.messages for r in rows],
    )


def is_episodic(task) -> bool:
    """Whether ``task``'s examples are environments (``task.environment(example)``) rather than single prompts."""
    return callable(getattr(task, "environment", None))


def sampler_eos(sampler) -> list[int] | None:
    """The ids that end a sampler's turn, where it says (opd's samplers do)."""
    eos = getattr(sampler, "eos_ids", None)
    return None if eos is None else [int(i) for i in (eos.tolist() if hasattr(eos, "tolist") else eos)]


class ScriptedSampler:
    """A ``Sampler`` that replays given assistant turns instead of sampling: episodes of tool-use traces, with the
    environment's real observations between the turns (SFT on scripted traces), or a prefix of turns after which
    ``then`` samples the rest (OVD keeping a student's accepted turns and letting the teacher go on).

    ``prompts[i]`` is episode ``i``'s prompt as ``run_episodes`` encodes it and ``scripts[i]`` its turns: texts
    (tokenised; a turn that calls a tool ends at its closing tag, as a sampled one stops at it, any other with EOS)
    or token-id lists (replayed as they are). Each ``sample`` call answers every row with its episode's next turn
    (found by its prompt); rows past their script are sampled by ``then`` together."""

    def __init__(self, tokenizer, prompts: Sequence[Sequence[int]], scripts: Sequence[Sequence], eos_id: int, then: Sampler | None = None):
        self.tokenizer, self.eos_id, self.then = tokenizer, eos_id, then
        self._scripts = {tuple(p): list(turns) for p, turns in zip(prompts, scripts)}
        self._turn = dict.fromkeys(self._scripts, 0)
        self._lengths = sorted({len(p) for p in prompts})

    @property
    def eos_ids(self):
        return getattr(self.then, "eos_ids", [self.eos_id])

    def _episode(self, ids: Sequence[int]) -> tuple[int, ...]:
        for length in self._lengths:
            if tuple(ids[:length]) in self._scripts:
                return tuple(ids[:length])
        raise EpisodeError("a scripted episode was asked for a turn of a conversation it does not know")

    def _reply(self, turn) -> list[int]:
        if not isinstance(turn, str):
            return list(turn)
        ids = self.tokenizer(turn, add_special_tokens=False)["input_ids"]
        return ids if CLOSE in turn else ids + [self.eos_id]

    def sample(self, prompts, params, generator=None, stop=()) -> Rollouts:
        keys = [self._episode(ids) for ids in prompts]
        replies: list[list[int] | None] = []
        logps: list[list[float] | None] = []
        for key in keys:
            turns, turn = self._scripts[key], self._turn[key]
            if turn < len(turns):
                replies.append(self._reply(turns[turn]))
                logps.append([0.0] * len(replies[-1]))
            elif self.then is None:
                raise EpisodeError(f"a scripted episode ran out of turns after {len(turns)} (its last turn should answer without a tool call)")
            else:
                replies.append(None)
                logps.append(None)
        later = [i for i, r in enumerate(replies) if r is None]
        if later:  # the rows past their script: sampled by ``then``, all together
            sampled = self.then.sample([prompts[i] for i in later], params, generator, stop)
            for j, i in enumerate(later):
                n = int(sampled.completion_mask_BC[j].sum())
                replies[i] = sampled.completion_ids_BC[j, :n].tolist()
                logps[i] = sampled.sampler_logp_BC[j, :n].tolist() if sampled.sampler_logp_BC is not None else [0.0] * n
        for key in dict.fromkeys(keys):  # a repeated example's rows are all at the same turn
            self._turn[key] += 1
        prompt_ids_BP, prompt_mask_BP = left_pad(prompts, self.tokenizer.pad_token_id)
        completion_ids, completion_mask = right_pad(replies, self.tokenizer.pad_token_id)
        logp = torch.zeros(completion_ids.shape)
        for i, row in enumerate(logps):
            logp[i, : len(row)] = torch.tensor(row)
        return Rollouts(
            prompt_ids_BP, prompt_mask_BP, completion_ids, completion_mask, completion_mask.clone(), logp,
            [self.tokenizer.decode(r, skip_special_tokens=True) for r in replies], list(range(len(replies))),
        )

    def update_weights(self, model) -> None:
        pass

    def close(self) -> None:
        pass


def agent_turns(rollouts: Rollouts, row: int) -> list[list[int]]:
    """The token ids of each of the agent's turns in episode ``row``: the runs of trained tokens of its completion."""
    ids, trained = rollouts.completion_ids_BC[row].tolist(), rollouts.loss_mask_BC[row].tolist()
    turns, current = [], []
    for token, flag in zip(ids, trained):
        if flag:
            current.append(token)
        elif current:
            turns.append(current)
            current = []
    return turns + ([current] if current else [])


def scripted_episodes(
    task, examples, scripts: Sequence[Sequence], tokenizer, template_kwargs=None, context: int | None = None,
    then: Sampler | None = None, params: SamplingConfig | None = None, generator: torch.Generator | None = None,
) -> Episodes:
    """One episode per example of an episodic task whose first assistant turns are ``scripts`` (texts or token ids,
    not sampled) and the rest, if ``then`` is given, sampled by it with ``params``; the task's limits and its
    environments' real observations. Every agent token — scripted or sampled — is a trained one."""
    envs = [task.environment(e) for e in examples]
    prompts = [prompt_ids(tokenizer, env.start(), template_kwargs_with_tools(template_kwargs, env.tools())) for env in envs]
    sampler = ScriptedSampler(tokenizer, prompts, scripts, tokenizer.eos_token_id, then)
    params = params or SamplingConfig(max_new_tokens=max(1, task.episode_limits().max_tokens))
    eos = sampler_eos(then) if then is not None else [tokenizer.eos_token_id]
    return run_episodes(envs, sampler, tokenizer, params, task.episode_limits(), generator, template_kwargs, eos, context)


def run_task_episodes(
    task, examples, sampler: Sampler, tokenizer, params: SamplingConfig, generator=None, template_kwargs=None, context: int | None = None,
) -> Episodes:
    """One episode per example of an episodic task, with the task's limits (and the model's ``context``)."""
    envs = [task.environment(e) for e in examples]
    return run_episodes(envs, sampler, tokenizer, params, task.episode_limits(), generator, template_kwargs, sampler_eos(sampler), context)
