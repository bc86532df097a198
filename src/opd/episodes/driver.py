"""The episode driver: a batch of environments (``episodes.environments``) sampled turn by turn.

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
from typing import Sequence

import torch

from ..config.sections import SamplingConfig
from ..engines.base import Sampler
from ..models.prompts import prompt_ids, render_prompt
from ..models.rollouts import Rollouts, build_rollouts
from .environments import Environment, EpisodeLimits, EpisodicTask


class EpisodeError(ValueError):
    """An episode that cannot be continued as token ids (e.g. a chat template that rewrites earlier turns)."""


@dataclass
class Episodes:
    rollouts: Rollouts  # one row per episode; loss_mask_BC is 1 on the agent's sampled tokens only
    rewards: list[float]
    turns: list[int]
    tool_calls: list[int]
    failed_calls: list[int]
    cut: list[str | None]  # "max_turns" / "max_tokens" (or the context) where a limit ended the episode, else None
    messages: list[list[dict]]  # each episode's conversation
    tools: list[list[dict]] = field(default_factory=list)  # each episode's tool schemas

    def played(self, examples: Sequence) -> list:
        """``examples`` (one per episode), each with the episode it played under ``meta["episode"]`` (its messages and
        tools): what a teacher that renders the conversation in a chat template of its own reads
        (``teachers.cross_tokenizer``)."""
        return [replace(e, meta={**e.meta, "episode": {"messages": m, "tools": t}}) for e, m, t in zip(examples, self.messages, self.tools)]

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


def text_after_reply(tokenizer, earlier: list[dict], observations: list[dict], template_kwargs: dict | None,
                     closed_with: str = "", turn: int = 0) -> str:
    """The text a chat template puts after an assistant reply that follows ``earlier``: the turn's closing (less
    ``closed_with``, the closing the model sampled itself), the ``observations`` and the next generation prompt
    (``template_kwargs``: with the episode's tools). Found by rendering a marker in the reply's place; a template
    that does not render the reply verbatim is an ``EpisodeError`` (``turn``: which, for the message)."""
    rendered = render_prompt(tokenizer, earlier + [{"role": "assistant", "content": MARK}] + observations, template_kwargs)
    if rendered.count(MARK) != 1:
        raise EpisodeError(
            f"the chat template does not render an assistant reply as it is (turn {turn}), so what follows the reply "
            "cannot be found; use a template that renders assistant content verbatim"
        )
    between = rendered[rendered.index(MARK) + len(MARK) :]
    return between[len(closed_with):] if closed_with and between.startswith(closed_with) else between


def _append_observations(tokenizer, row: _Row, ended_eos: bool, observations: list[dict], template_kwargs, limits: EpisodeLimits) -> None:
    """Append, untrained, the tokens the template puts after this turn's reply: the turn's closing (unless the
    model sampled it), the observations and the next generation prompt."""
    closed_with = tokenizer.decode(row.ids[-1:], skip_special_tokens=False) if ended_eos else ""
    between = text_after_reply(tokenizer, row.messages[:-1], observations, template_kwargs_with_tools(template_kwargs, row.tools),
                               closed_with, row.turns)
    row.messages += observations
    new_ids = tokenizer(between, add_special_tokens=False)["input_ids"]
    if len(row.ids) + len(new_ids) >= row.budget:  # no room left for another reply
        new_ids = new_ids[: row.budget - len(row.ids)]
        row.done, row.cut = True, _limit(row, limits)
    row.ids += new_ids
    row.trained += [0] * len(new_ids)
    row.logps += [0.0] * len(new_ids)


def _episodes(rows: list[_Row], tokenizer) -> Episodes:
    rollouts = build_rollouts(
        [r.prompt_ids for r in rows], [r.ids for r in rows], tokenizer.pad_token_id, trained=[r.trained for r in rows],
        logps=[r.logps for r in rows], texts=[tokenizer.decode(r.ids, skip_special_tokens=True) for r in rows],
    )
    return Episodes(
        rollouts, [r.reward for r in rows], [r.turns for r in rows], [r.tool_calls for r in rows], [r.failed_calls for r in rows],
        [r.cut for r in rows], [r.messages for r in rows], [r.tools for r in rows],
    )


def run_task_episodes(
    task: EpisodicTask, examples, sampler: Sampler, tokenizer, params: SamplingConfig, generator=None, template_kwargs=None,
    context: int | None = None,
) -> Episodes:
    """One episode per example of a task of episodes, with the task's limits (and the model's ``context``); a turn
    ends at the sampler's EOS ids or a stop string."""
    envs = [task.environment(e) for e in examples]
    return run_episodes(envs, sampler, tokenizer, params, task.episode_limits(), generator, template_kwargs, sampler.eos_ids, context)
