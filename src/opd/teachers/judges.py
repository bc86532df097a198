"""Verbal judges: a score from 0 to 9 for a trajectory (and, where they can, for each step); the protocols
(``Judge``, ``StepJudge``, ``TurnJudge``) are ``tasks.base``'s.

- a task's own step checker, for tasks whose steps can be checked (``Task.step_judge``; the
  arithmetic scratchpad's gives ``9 × fraction of correct steps``, per-step scores 9 or 0).
- ``ModelJudge``: a local causal LM; one forward pass over a judge prompt, and the score is
  the expected digit ``Σ_d d · P(d)`` over the ten digit tokens (renormalised among them).
- ``HTTPJudge``: an OpenAI-compatible chat endpoint whose reply contains ``Score: d``;
  timeouts, bounded retries with exponential backoff, and a clear ``JudgeError`` when the
  endpoint keeps failing or answering something without a score.
- a user's own (``method.ovd.judge: module:attribute``, or the object through the Python API): an
  object with the ``Judge`` protocol's ``score``, or a function ``fn(completion, row) -> float`` in
  [0, 9] wrapped by ``FunctionJudge``.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import torch

from ..models.prompts import encode_prompt
from ..models.rollouts import left_pad
from ..services.http import JSONClient, OutagePolicy, ServiceError, ServiceOutage
from ..config.objects import import_object
from ..config.sections import ConfigError
from ..tasks.base import Example
from ..tasks.reward_functions import example_row, example_where

JUDGE_KINDS = ("programmatic", "model", "http")

JUDGE_INSTRUCTION = (
    "Rate the following solution from 0 (wrong) to 9 (fully correct). Reply with 'Score: d'.\n"
    "Problem: {problem}\nSolution: {solution}"
)
SCORE_PATTERN = re.compile(r"Score:\s*([0-9])\b")


class JudgeError(RuntimeError):
    """A judge that cannot give a score; the message says what it answered."""


class FunctionJudge:
    """A user's function as a trajectory judge: ``fn(completion, row) -> score`` in [0, 9], ``row`` as reward functions
    get it (the example's JSON object). A score that is not a finite number in [0, 9], or an exception, is a
    ``JudgeError`` naming the function and the row."""

    def __init__(self, fn, name: str):
        self.fn = fn
        self.name = name

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> list[float]:
        scores = []
        for example, completion in zip(examples, completions):
            where = example_where(example)
            try:
                value = self.fn(completion, example_row(example))
            except Exception as err:  # noqa: BLE001 - the user's code: any error is named with its row
                raise JudgeError(f"method.ovd.judge {self.name} raised on {where}: {type(err).__name__}: {err}") from err
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 9:
                raise JudgeError(f"method.ovd.judge {self.name} returned {value!r} on {where}, not a score in [0, 9]")
            scores.append(float(value))
        return scores


def user_judge(name: str):
    """The judge ``method.ovd.judge`` names when it is none of ``JUDGE_KINDS``: an object with ``score`` used as it
    is, a function wrapped in ``FunctionJudge``; a one-line ``ConfigError`` otherwise."""
    if ":" not in name and not name.startswith("python:"):
        raise ConfigError(f"config key 'method.ovd.judge' must be one of {', '.join(JUDGE_KINDS)}, or a module:attribute judge; got {name!r}")
    obj = import_object(name, "method.ovd.judge")
    if callable(getattr(obj, "score", None)):
        return obj
    if callable(obj):
        return FunctionJudge(obj, name)
    raise ConfigError(f"config key 'method.ovd.judge': {name!r} is a {type(obj).__name__}: neither a function nor an object with score()")


class ModelJudge:
    """Expected digit after a judge prompt, from one forward pass of a local causal LM."""

    def __init__(self, model: torch.nn.Module, tokenizer, instruction: str = JUDGE_INSTRUCTION, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.batch_size = batch_size
        digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        if any(i is None or i == tokenizer.unk_token_id for i in digit_ids):
            raise JudgeError("the judge's tokenizer has no single token for each digit 0-9")
        self.digit_ids = torch.tensor(digit_ids)

    def prompt_ids(self, example: Example, completion: str) -> list[int]:
        text = self.instruction.format(problem=example.prompt, solution=completion)
        return encode_prompt(self.tokenizer, [{"role": "user", "content": text}]) + self.tokenizer(
            "Score: ", add_special_tokens=False
        )["input_ids"]

    @torch.no_grad()
    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> list[float]:
        prompts = [self.prompt_ids(e, c) for e, c in zip(examples, completions)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            ids_BP, mask_BP = left_pad(prompts[start : start + self.batch_size], self.tokenizer.pad_token_id)
            ids_BP, mask_BP = ids_BP.to(device), mask_BP.to(device)
            position_ids = (mask_BP.cumsum(-1) - 1).clamp(min=0)
            logits_BV = self.model(input_ids=ids_BP, attention_mask=mask_BP, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
            digit_probs = logits_BV.float()[:, self.digit_ids.to(device)].softmax(-1)
            scores += (digit_probs * torch.arange(10, device=device)).sum(-1).tolist()
        return scores


class HTTPJudge:
    """An OpenAI-compatible ``/v1/chat/completions`` judge whose reply contains ``Score: d``.

    The API key is read from the environment variable ``api_key_env`` (never from a config
    file). Requests go through ``services.http.JSONClient``: a total deadline per request
    (``deadline``), bounded retries with backoff, a capped reply, no redirects, the key only for
    the configured host. A reply that is not a chat completion or has no score is retried too;
    when every attempt fails, ``JudgeError`` names the last problem — or, when the judge did not answer at all, a
    ``ServiceError`` (``ServiceOutage`` once it had answered: ``outage`` decides whether to wait for it first).
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = None,
        deadline: float = 30.0,
        retries: int = 3,
        backoff: float = 1.0,
        instruction: str = JUDGE_INSTRUCTION,
        max_reply_mb: float = 1.0,
        outage: OutagePolicy | None = None,
    ):
        self.url = url.rstrip("/") + "/v1/chat/completions" if not url.rstrip("/").endswith("/chat/completions") else url
        self.model = model
        api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not api_key:
            raise JudgeError(f"environment variable {api_key_env} (the judge's API key) is not set")
        self.instruction = instruction
        try:
            self.client = JSONClient(self.url, api_key, deadline, retries, backoff, int(max_reply_mb * (1 << 20)), outage)
        except ServiceError as err:
            raise JudgeError(f"judge: {err}") from None

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> list[float]:
        return [self.score_one(e, c) for e, c in zip(examples, completions)]

    def score_one(self, example: Example, completion: str) -> float:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.instruction.format(problem=example.prompt, solution=completion)}],
            "max_tokens": 16,
            "temperature": 0,
        }
        try:  # transport failures and scoreless replies share one retry budget
            return self.client.post(body, read=_score)
        except ServiceOutage:
            raise  # it answered before: its outage policy gave up; the loop stops at the step boundary, resumably
        except ServiceError as err:
            if err.problem is None:  # a redirect, a 4xx: refused without retrying, since asking again will not help
                raise JudgeError(f"judge: {err}") from None
            message = f"judge at {self.url} gave no score after {self.client.retries + 1} attempts: {err.problem}"
            if err.unavailable:  # no reply at all: a service error, which stops the loop at the step boundary
                raise ServiceError(message, problem=err.problem, unavailable=True) from None
            raise JudgeError(message) from None


def _score(payload) -> float:
    """The digit after ``Score:`` in an OpenAI chat completion; a transient ``ServiceError`` when there is none."""
    reply = _chat_content(payload)
    if reply is None:
        raise ServiceError("the response is not an OpenAI chat completion", transient=True)
    match = SCORE_PATTERN.search(reply)
    if match is None:
        raise ServiceError(f"the reply has no 'Score: d' ({reply[:80]!r})", transient=True)
    return float(match.group(1))


def _chat_content(payload) -> str | None:
    """``choices[0].message.content`` of an OpenAI chat completion when it is a string, else None."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
