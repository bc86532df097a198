"""Scripted episodes: assistant turns replayed instead of sampled, with the environment's real observations between
them — SFT on tool-use traces, and OVD keeping a student's accepted turns before the teacher goes on."""

from __future__ import annotations

from typing import Sequence

import torch

from ..config.sections import SamplingConfig
from ..engines.base import Sampler
from ..models.prompts import prompt_ids
from ..models.rollouts import Rollouts, build_rollouts
from .driver import EpisodeError, Episodes, run_episodes, template_kwargs_with_tools
from .environments import EpisodicTask
from .tool_calls import CLOSE


class ScriptedSampler(Sampler):
    """A ``Sampler`` that replays given assistant turns instead of sampling: episodes of tool-use traces, with the
    environment's real observations between the turns (SFT on scripted traces), or a prefix of turns after which
    ``then`` samples the rest (OVD keeping a student's accepted turns and letting the teacher go on).

    ``prompts[i]`` is episode ``i``'s prompt as ``run_episodes`` encodes it and ``scripts[i]`` its turns: texts
    (tokenised; a turn that calls a tool ends at its closing tag, as a sampled one stops at it, any other with EOS)
    or token-id lists (replayed as they are). Each ``sample`` call answers every row with its episode's next turn
    (found by its prompt); rows past their script are sampled by ``then`` together."""

    def __init__(self, tokenizer, prompts: Sequence[Sequence[int]], scripts: Sequence[Sequence], eos_id: int, then: Sampler | None = None):
        self.tokenizer, self.eos_id, self.then = tokenizer, eos_id, then
        self.eos_ids = then.eos_ids if then is not None else [eos_id]  # a scripted turn ends as ``then``'s would
        self._scripts = {tuple(p): list(turns) for p, turns in zip(prompts, scripts)}
        self._turn = dict.fromkeys(self._scripts, 0)
        self._lengths = sorted({len(p) for p in prompts})

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
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in replies]
        return build_rollouts(prompts, replies, self.tokenizer.pad_token_id, logps=logps, texts=texts)

    def update_weights(self, model) -> None:
        pass

    def finish_round(self) -> None:
        if self.then is not None:
            self.then.finish_round()

    def decodes_with(self, module) -> bool:
        return self.then is not None and self.then.decodes_with(module)

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
    task: EpisodicTask, examples, scripts: Sequence[Sequence], tokenizer, template_kwargs=None, context: int | None = None,
    then: Sampler | None = None, params: SamplingConfig | None = None, generator: torch.Generator | None = None,
) -> Episodes:
    """One episode per example of an episodic task whose first assistant turns are ``scripts`` (texts or token ids,
    not sampled) and the rest, if ``then`` is given, sampled by it with ``params``; the task's limits and its
    environments' real observations. Every agent token — scripted or sampled — is a trained one."""
    envs = [task.environment(e) for e in examples]
    prompts = [prompt_ids(tokenizer, env.start(), template_kwargs_with_tools(template_kwargs, env.tools())) for env in envs]
    sampler = ScriptedSampler(tokenizer, prompts, scripts, tokenizer.eos_token_id, then)
    params = params or SamplingConfig(max_new_tokens=max(1, task.episode_limits().max_tokens))
    return run_episodes(envs, sampler, tokenizer, params, task.episode_limits(), generator, template_kwargs, sampler.eos_ids, context)
