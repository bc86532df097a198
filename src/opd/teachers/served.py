"""A teacher scored by an OpenAI-compatible server (stock vLLM), over HTTP.

Scoring a rollout row sends its real tokens (prompt, then completion) to ``/v1/completions``
with ``prompt_logprobs=K`` and ``max_tokens=1``. vLLM answers, for every position after the first,
the log-probs of the token actually there and of its K most likely tokens, all under the
untempered softmax (``log softmax(z)``, temperature 1). From that:

- ``token_logprobs`` → ``[B, C]`` log-probs of the completion tokens (OPD, G-OPD/ExOPD, OPD+,
  REOPOLD, OPSD-sampled, a served reference);
- ``distributions`` → ``TopLogprobs`` ``[B, C, K]`` for GKD / OPSD-JSD, whose loss puts the
  mass outside the top-K into one tail class (``objectives.fused``, ``teacher_topk_mass`` logged).

Because the server scores at temperature 1, a served teacher refuses any other temperature
(``teacher.temperature``, a full-vocabulary loss's ``temperature``) rather than approximate it.
Rows go out as concurrent requests (``teacher.concurrency``) through the server's ``engines.served.ServedModel``.

A server that fails mid-step (no usable reply, or an outage its ``teacher.outage`` policy gave up on) does not raise
here: the failure is kept for ``take_failure`` and the step's rows are scored NaN from then on, so the step's loss is
not finite on this rank, every rank skips its update together, and the loop stops the run at the step boundary.
"""

from __future__ import annotations

import math

import torch

from ..engines.served import ServedModel, ServedSampler, check_served_pairing, transient
from ..models.loading import load_tokenizer
from ..models.rollouts import Rollouts
from ..services.http import ServiceError
from .base import StatelessTeacher, TopLogprobs


def served_teacher(teacher_cfg, url: str, key: str, student_tok, vocab_size: int, eos_ids, pairing, device, own: bool = False):
    """``(ServedTeacher, ServedSampler)`` for the model at ``url``, after the pairing check against the student.

    ``own`` (``teacher.tokenizer=own``): the teacher reads text in its own tokenizer, whose local copy
    (``teacher.tokenizer_path``) is checked against the server's instead; it has no sampler (None)."""
    served = ServedModel(teacher_cfg, url, key)
    if own:
        served_tok = load_tokenizer(teacher_cfg.tokenizer_path, "teacher.tokenizer_path", teacher_cfg.trust_remote_code)
        check_served_pairing(served, served_tok, served_tok, pairing)
        return ServedTeacher(served, min(teacher_cfg.top_k, len(served_tok)), len(served_tok)), None
    if teacher_cfg.tokenizer_path is not None:
        served_tok = load_tokenizer(teacher_cfg.tokenizer_path, "teacher.tokenizer_path", teacher_cfg.trust_remote_code)
    else:
        served_tok = student_tok
    check_served_pairing(served, student_tok, served_tok, pairing)
    top_k = min(teacher_cfg.top_k, vocab_size)
    return ServedTeacher(served, top_k, vocab_size), ServedSampler(served, student_tok, eos_ids, device)


def _row_tokens(rollouts: Rollouts, i: int) -> tuple[list[int], list[int]]:
    prompt = rollouts.prompt_ids_BP[i][rollouts.prompt_mask_BP[i].bool()].tolist()
    completion = rollouts.completion_ids_BC[i][rollouts.completion_mask_BC[i].bool()].tolist()
    return prompt, completion


class ServedTeacher(StatelessTeacher):
    """A teacher scored by a server: sampled-token log-probs, and top-``k`` log-probs per position."""

    def __init__(self, served: ServedModel, top_k: int, vocab_size: int):
        self.served, self.top_k, self.vocab_size = served, top_k, vocab_size
        self.failure: ServiceError | None = None

    def take_failure(self) -> ServiceError | None:
        failure, self.failure = self.failure, None
        return failure

    def _score(self, rollouts: Rollouts, top_k: int) -> list[list[dict]] | None:
        """Per row, the server's entries for the completion positions: ``{token_id: logprob}`` each; None once the
        server has failed this step (``failure``)."""
        if self.failure is not None:
            return None
        try:
            return self._ask(rollouts, top_k)
        except ServiceError as err:
            self.failure = err
            return None

    def _ask(self, rollouts: Rollouts, top_k: int) -> list[list[dict]]:

        def score_row(i: int) -> list[dict]:
            prompt, completion = _row_tokens(rollouts, i)
            if not completion:
                return []
            sequence = prompt + completion
            payload = {"prompt": sequence, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}
            return self.served.post("/v1/completions", payload, lambda reply: _completion_entries(reply, sequence, len(prompt)))

        return self.served.map_rows(score_row, range(rollouts.batch_size))

    def token_logprobs(self, rollouts: Rollouts, temperature: float = 1.0) -> torch.Tensor:
        if temperature != 1.0:
            raise ValueError(f"a served teacher scores at temperature 1 (its prompt log-probs are untempered), not {temperature}")
        rows = self._score(rollouts, 0)
        if rows is None:
            return torch.full(rollouts.completion_ids_BC.shape, math.nan, device=rollouts.completion_ids_BC.device)
        logp_BC = torch.zeros(rollouts.completion_ids_BC.shape, dtype=torch.float32)
        for i, entries in enumerate(rows):
            _, completion = _row_tokens(rollouts, i)
            for j, (token, entry) in enumerate(zip(completion, entries)):
                logp_BC[i, j] = entry[token]
        return logp_BC.to(rollouts.completion_ids_BC.device)

    def distributions(self, rollouts: Rollouts) -> TopLogprobs:
        rows = self._score(rollouts, self.top_k)
        try:
            return self._top_logprobs(rollouts, rows)
        except ServiceError as err:  # a reply of the wrong size: as a failed request, the step is given up on every rank
            self.failure = err
            return self._top_logprobs(rollouts, None)

    def _top_logprobs(self, rollouts: Rollouts, rows: list[list[dict]] | None) -> TopLogprobs:
        B, C, K = *rollouts.completion_ids_BC.shape, self.top_k
        ids_BCK = torch.zeros(B, C, K, dtype=torch.long)
        logp_BCK = torch.full((B, C, K), -math.inf if rows is not None else math.nan, dtype=torch.float32)
        token_logp_BC = torch.zeros(B, C, dtype=torch.float32)
        for i, entries in enumerate(rows or ()):
            _, completion = _row_tokens(rollouts, i)
            for j, (token, entry) in enumerate(zip(completion, entries)):
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:K]
                if len(top) < K:
                    raise ServiceError(f"{self.served.key}: the server gave {len(top)} top log-probs, not teacher.top_k={K} (its --max-logprobs?)")
                if max(t for t, _ in top) >= self.vocab_size:
                    raise ServiceError(f"{self.served.key}: the server returned token ids beyond the student's {self.vocab_size}-row output layer")
                ids_BCK[i, j] = torch.tensor([t for t, _ in top])
                logp_BCK[i, j] = torch.tensor([lp for _, lp in top])
                token_logp_BC[i, j] = entry[token]
        device = rollouts.completion_ids_BC.device
        return TopLogprobs(ids_BCK.to(device), logp_BCK.to(device), token_logp_BC.to(device))


def _completion_entries(reply, sequence: list[int], prompt_length: int) -> list[dict[int, float]]:
    """The ``prompt_logprobs`` entries of the completion positions, as ``{token_id: logprob}``; a reply of the
    wrong shape is a transient ``ServiceError`` (retried)."""
    try:
        entries = reply["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise transient("the reply has no choices[0].prompt_logprobs (a vLLM server is needed for prompt_logprobs)") from None
    if not isinstance(entries, list) or len(entries) != len(sequence):
        raise transient(f"prompt_logprobs covers {len(entries) if isinstance(entries, list) else '?'} positions, not {len(sequence)}")
    out = []
    for position in range(prompt_length, len(sequence)):
        entry = entries[position]
        try:
            parsed = {int(token): float(v["logprob"]) for token, v in entry.items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise transient(f"prompt_logprobs[{position}] is not a {{token_id: {{logprob}}}} map") from None
        if sequence[position] not in parsed:
            raise transient(f"prompt_logprobs[{position}] does not include the token at that position")
        out.append(parsed)
    return out
