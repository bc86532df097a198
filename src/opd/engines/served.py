"""A model behind an OpenAI-compatible server (stock vLLM): the connection, its pairing check, and sampling from it.

``ServedModel`` is one model on one server (its name, context length and a ``services.http.JSONClient``
for its endpoints: a total deadline per request, bounded retries, capped replies, the API key only to
the configured host); ``check_served_pairing`` refuses a server whose tokenizer would not give the
student's ids the student's meaning. ``ServedSampler`` generates from it (teacher demonstrations and
the teacher's own evaluation), with its sampled tokens' log-probs. Scoring rollouts on a server — the
served teacher — is ``teachers.served``; docs/engines.md has the whole picture.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from ..config.sections import SamplingConfig
from ..models.pairing import ROUND_TRIP_TEXT, raise_pairing, tokenizer_problems
from ..models.rollouts import Rollouts, build_rollouts
from ..services.http import JSONClient, OutagePolicy, ServiceError
from .base import Sampler, row_seeds


def transient(message: str) -> ServiceError:
    return ServiceError(message, transient=True)


def base_url(url: str) -> str:
    """``http://host:port`` (any path kept, a trailing ``/v1`` dropped): the endpoints are ``/v1/…`` below it."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class ServedModel:
    """One model on one OpenAI-compatible server: its name, context length and a client for its endpoints.

    ``key``: the config key that named the server (``teacher.url``, ``teacher.routes.<name>``), used in errors;
    ``keys``: the prefix of the keys ``cfg`` holds (``teacher.``), and ``outage_keys`` that of its outage policy's
    keys ("" where it has none and always stops).
    """

    def __init__(self, cfg, url: str, key: str = "teacher.url", keys: str = "teacher.", outage_keys: str | None = None):
        self.key, self.keys, self.base = key, keys, base_url(url)
        api_key = None
        if cfg.api_key_env:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise ServiceError(f"{key}: {keys}api_key_env names {cfg.api_key_env}, which is not set")
        outage = OutagePolicy(key, keys if outage_keys is None else outage_keys, cfg.outage, cfg.outage_seconds)
        self.client = JSONClient(
            self.base + "/v1/completions", api_key, cfg.deadline, cfg.retries, backoff=1.0,
            max_reply_bytes=int(cfg.max_reply_mb * (1 << 20)), outage=outage,
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
                raise ServiceError(f"{self.key}: the server serves {len(names)} models ({', '.join(names)}); set {self.keys}model")
            wanted = names[0]
        if wanted not in names:
            raise ServiceError(f"{self.key}: the server does not serve '{wanted}' ({self.keys}model); it serves {', '.join(names)}")
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


def check_served_pairing(served: ServedModel, student_tok, served_tok, pairing) -> list[str]:
    """Refuse a served model whose token ids would not mean the student's: the local copy of its tokenizer
    against the student's, then the server's own tokenizer (``/tokenize``, ``/detokenize``) on a round trip
    and on the EOS token. Returns the notes (warnings issued)."""
    problems, notes = tokenizer_problems(student_tok, served_tok, pairing)
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


class ServedSampler(Sampler):
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
        seeds = row_seeds(generator, len(prompts))

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
        completions = [ids for ids, _ in results]
        logps = [values if params.temperature else [0.0] * len(values) for _, values in results]  # greedy: no density
        return build_rollouts(
            prompts, completions, self.pad_id, logps=logps, texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            device=self.device,
        )


def _sampled_tokens(reply) -> tuple[list[int], list[float]]:
    """Token ids (``return_tokens_as_token_ids``: ``"token_id:N"``) and their log-probs from a completion reply."""
    try:
        logprobs = reply["choices"][0]["logprobs"]
        ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
        values = [float(v) for v in logprobs["token_logprobs"]]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise transient("the reply has no choices[0].logprobs with token ids (return_tokens_as_token_ids)") from None
    if len(ids) != len(values):
        raise transient("the reply's tokens and token_logprobs differ in length")
    return ids, values
