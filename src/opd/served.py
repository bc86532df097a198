"""A model behind an OpenAI-compatible server (stock vLLM) as a teacher: scoring and sampling over HTTP.

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

Rows go out as concurrent requests (``teacher.concurrency``) through ``http_client.JSONClient``:
a total deadline per request, bounded retries, capped replies, the API key only to the
configured host. ``ServedSampler`` generates from the same server (teacher demonstrations and
the teacher's own evaluation), with its sampled tokens' log-probs.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from .http_client import JSONClient, ServiceError
from .models import ROUND_TRIP_TEXT, raise_pairing, tokenizer_problems
from .rollout import Rollouts, left_pad, right_pad
from .sections import SamplingConfig
from .teachers import StatelessTeacher, TopLogprobs


def _transient(message: str) -> ServiceError:
    return ServiceError(message, transient=True)


def base_url(url: str) -> str:
    """``http://host:port`` (any path kept, a trailing ``/v1`` dropped): the endpoints are ``/v1/…`` below it."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class ServedModel:
    """One model on one OpenAI-compatible server: its name, context length and a client for its endpoints.

    ``key``: the config key that named the server (``teacher.url``, ``teacher.routes.<name>``), used in errors.
    """

    def __init__(self, cfg, url: str, key: str = "teacher.url"):
        self.key, self.base = key, base_url(url)
        api_key = None
        if cfg.api_key_env:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise ServiceError(f"{key}: teacher.api_key_env names {cfg.api_key_env}, which is not set")
        self.client = JSONClient(
            self.base + "/v1/completions", api_key, cfg.deadline, cfg.retries, backoff=1.0,
            max_reply_bytes=int(cfg.max_reply_mb * (1 << 20)),
        )
        self.concurrency = cfg.concurrency
        self.name, self.context = self._model_card(cfg.model)

    def _model_card(self, wanted: str | None) -> tuple[str, int | None]:
        try:
            reply = self.client.get(self.base + "/v1/models")
        except ServiceError as err:
            raise ServiceError(f"{self.key}: the server at {self.base} cannot be reached: {err}") from None
        cards = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(cards, list) or not all(isinstance(c, dict) and "id" in c for c in cards):
            raise ServiceError(f"{self.key}: {self.base}/v1/models gave no model list; is it an OpenAI-compatible server?")
        names = [c["id"] for c in cards]
        if wanted is None:
            if len(names) != 1:
                raise ServiceError(f"{self.key}: the server serves {len(names)} models ({', '.join(names)}); set teacher.model")
            wanted = names[0]
        if wanted not in names:
            raise ServiceError(f"{self.key}: the server does not serve '{wanted}' (teacher.model); it serves {', '.join(names)}")
        card = cards[names.index(wanted)]
        context = card.get("max_model_len")
        return wanted, int(context) if isinstance(context, int) else None

    def post(self, path: str, payload: dict, read=None):
        return self.client.post({"model": self.name, **payload}, read, url=self.base + path)

    def map_rows(self, fn, rows: Sequence) -> list:
        """``fn`` over ``rows``, ``concurrency`` requests at a time, results in order."""
        if len(rows) <= 1 or self.concurrency == 1:
            return [fn(row) for row in rows]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(rows))) as pool:
            return list(pool.map(fn, rows))

    def close(self) -> None:
        self.client.close()


def check_served_pairing(served: ServedModel, student_tok, served_tok, allow_template_mismatch: bool) -> list[str]:
    """Refuse a served model whose token ids would not mean the student's: the local copy of its tokenizer
    against the student's, then the server's own tokenizer (``/tokenize``, ``/detokenize``) on a round trip
    and on the EOS token. Returns the notes (warnings issued)."""
    problems, notes = tokenizer_problems(student_tok, served_tok, allow_template_mismatch)
    ids = student_tok(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    try:
        served_ids = served.post("/tokenize", {"prompt": ROUND_TRIP_TEXT, "add_special_tokens": False}).get("tokens")
        text = served.post("/detokenize", {"tokens": ids}).get("prompt")
        eos = served.post("/tokenize", {"prompt": student_tok.eos_token, "add_special_tokens": False}).get("tokens")
    except (ServiceError, AttributeError) as err:
        raise ServiceError(f"{served.key}: the server's /tokenize and /detokenize are needed for the pairing check: {err}") from None
    if served_ids != ids:
        problems.append("the server's tokenizer splits the same text into different ids")
    if text != student_tok.decode(ids):
        problems.append("the server's tokenizer decodes the same ids into different text")
    if eos != [student_tok.eos_token_id]:
        problems.append(f"the server reads the EOS token {student_tok.eos_token!r} as {eos}, not [{student_tok.eos_token_id}]")
    return raise_pairing([f"{served.key}: {p}" for p in problems], notes)


def is_url(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def served_teacher(teacher_cfg, url: str, key: str, student_tok, vocab_size: int, eos_ids, allow_template_mismatch: bool, device):
    """``(ServedTeacher, ServedSampler)`` for the model at ``url``, after the pairing check against the student."""
    from .models import load_tokenizer

    served = ServedModel(teacher_cfg, url, key)
    if teacher_cfg.tokenizer is not None:
        served_tok = load_tokenizer(teacher_cfg.tokenizer, "teacher.tokenizer", teacher_cfg.trust_remote_code)
    else:
        served_tok = student_tok
    check_served_pairing(served, student_tok, served_tok, allow_template_mismatch)
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

    def _score(self, rollouts: Rollouts, top_k: int) -> list[list[dict]]:
        """Per row, the server's entries for the completion positions: ``{token_id: logprob}`` each."""

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
        logp_BC = torch.zeros(rollouts.completion_ids_BC.shape, dtype=torch.float32)
        for i, entries in enumerate(rows):
            _, completion = _row_tokens(rollouts, i)
            for j, (token, entry) in enumerate(zip(completion, entries)):
                logp_BC[i, j] = entry[token]
        return logp_BC.to(rollouts.completion_ids_BC.device)

    def distributions(self, rollouts: Rollouts) -> TopLogprobs:
        rows = self._score(rollouts, self.top_k)
        B, C, K = *rollouts.completion_ids_BC.shape, self.top_k
        ids_BCK = torch.zeros(B, C, K, dtype=torch.long)
        logp_BCK = torch.full((B, C, K), -math.inf, dtype=torch.float32)
        token_logp_BC = torch.zeros(B, C, dtype=torch.float32)
        for i, entries in enumerate(rows):
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
        raise _transient("the reply has no choices[0].prompt_logprobs (a vLLM server is needed for prompt_logprobs)") from None
    if not isinstance(entries, list) or len(entries) != len(sequence):
        raise _transient(f"prompt_logprobs covers {len(entries) if isinstance(entries, list) else '?'} positions, not {len(sequence)}")
    out = []
    for position in range(prompt_length, len(sequence)):
        entry = entries[position]
        try:
            parsed = {int(token): float(v["logprob"]) for token, v in entry.items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise _transient(f"prompt_logprobs[{position}] is not a {{token_id: {{logprob}}}} map") from None
        if sequence[position] not in parsed:
            raise _transient(f"prompt_logprobs[{position}] does not include the token at that position")
        out.append(parsed)
    return out


class ServedSampler:
    """Sampling from a served model (``Sampler`` protocol): the teacher's demonstrations and its evaluation."""

    def __init__(self, served: ServedModel, tokenizer, eos_token_ids: Sequence[int], device: torch.device | str = "cpu"):
        self.served, self.tokenizer, self.device = served, tokenizer, torch.device(device)
        self.pad_id, self.eos_ids = tokenizer.pad_token_id, sorted(set(eos_token_ids))

    def update_weights(self, model) -> None:
        raise TypeError("a served model's weights are the server's; they cannot be pushed from the trainer")

    def close(self) -> None:
        pass

    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingConfig, generator: torch.Generator | None = None, stop: Sequence[str] = (),
    ) -> Rollouts:
        seed_device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator, device=seed_device).tolist()

        def sample_row(row) -> tuple[list[int], list[float]]:
            prompt, seed = row
            payload = {
                "prompt": list(prompt), "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "top_k": params.top_k or -1, "seed": seed, "logprobs": 0,
                "stop_token_ids": self.eos_ids, "return_tokens_as_token_ids": True, "skip_special_tokens": False,
            }
            if stop:
                payload.update(stop=list(stop), include_stop_str_in_output=True)
            return self.served.post("/v1/completions", payload, _sampled_tokens)

        results = self.served.map_rows(sample_row, list(zip(prompts, seeds)))
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)
        completion_ids, completion_mask = right_pad([ids for ids, _ in results], self.pad_id)
        logp_BC = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for i, (_, logps) in enumerate(results):
            logp_BC[i, : len(logps)] = torch.tensor(logps, dtype=torch.float32) if params.temperature else 0.0
        return Rollouts(
            prompt_ids_BP=prompt_ids, prompt_mask_BP=prompt_mask, completion_ids_BC=completion_ids,
            completion_mask_BC=completion_mask, loss_mask_BC=completion_mask.clone(), sampler_logp_BC=logp_BC,
            texts=self.tokenizer.batch_decode(completion_ids.tolist(), skip_special_tokens=True), group_B=list(range(len(prompts))),
        ).to(self.device)


def _sampled_tokens(reply) -> tuple[list[int], list[float]]:
    """Token ids (``return_tokens_as_token_ids``: ``"token_id:N"``) and their log-probs from a completion reply."""
    try:
        logprobs = reply["choices"][0]["logprobs"]
        ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
        values = [float(v) for v in logprobs["token_logprobs"]]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise _transient("the reply has no choices[0].logprobs with token ids (return_tokens_as_token_ids)") from None
    if len(ids) != len(values):
        raise _transient("the reply's tokens and token_logprobs differ in length")
    return ids, values
