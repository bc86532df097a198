"""Rollouts and the samplers that produce them.

A ``Rollouts`` batch holds left-padded prompts and right-padded completions, so every
row's completion starts at the same column ``P`` of ``input_ids_BL``. That alignment lets
the student, the teacher and every objective work on ``[B, C]`` completion tensors.

``Sampler`` is the engine interface: token-id prompts in, ``Rollouts`` out, new weights pushed
in after each optimizer step, resources released at the end. ``HFSampler`` runs any
``AutoModelForCausalLM`` with a KV cache; an inference engine (vLLM) implements the same
three methods.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import torch

from .sections import SamplingConfig
from .sharding import is_gathered


@dataclass
class Rollouts:
    prompt_ids_BP: torch.Tensor  # left-padded
    prompt_mask_BP: torch.Tensor  # 1 on real prompt tokens
    completion_ids_BC: torch.Tensor  # right-padded with the pad id
    completion_mask_BC: torch.Tensor  # 1 on completion tokens that exist (EOS included)
    loss_mask_BC: torch.Tensor  # 1 on tokens the student generated and is trained on
    sampler_logp_BC: torch.Tensor | None = None  # log-prob of each token under the sampling distribution
    texts: list[str] = field(default_factory=list)  # decoded completions, special tokens stripped
    group_B: list[int] = field(default_factory=list)  # index of each row's example in the batch
    route_B: list[str | None] = field(default_factory=list)  # teacher route of each row (multi-teacher), if any

    @property
    def batch_size(self) -> int:
        return self.completion_ids_BC.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompt_ids_BP.shape[1]

    @property
    def completion_lengths_B(self) -> torch.Tensor:
        return self.completion_mask_BC.sum(-1)

    def input_ids_BL(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids_BP, self.completion_ids_BC], dim=1)

    def attention_mask_BL(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask_BP, self.completion_mask_BC], dim=1)

    def with_prompts(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor) -> "Rollouts":
        """The same completions behind other prompts (e.g. a teacher's privileged prompt)."""
        return replace(self, prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP)

    def select(self, rows: Sequence[int]) -> "Rollouts":
        """The given rows, in that order (texts, groups and routes follow)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.completion_ids_BC.device)
        pick = lambda values: [values[i] for i in rows] if values else []  # noqa: E731
        return replace(
            self._map_tensors(lambda t: t.index_select(0, index)),
            texts=pick(self.texts),
            group_B=pick(self.group_B),
            route_B=pick(self.route_B),
        )

    def to(self, device: torch.device | str) -> "Rollouts":
        return self._map_tensors(lambda t: t.to(device))

    def _map_tensors(self, fn) -> "Rollouts":
        return replace(self, **{name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in TENSOR_FIELDS})


TENSOR_FIELDS = ("prompt_ids_BP", "prompt_mask_BP", "completion_ids_BC", "completion_mask_BC", "loss_mask_BC", "sampler_logp_BC")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(ids_BP, mask_BP)``, padding on the left."""
    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(ids_BC, mask_BC)``, padding on the right."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def rollouts_from_completions(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, texts: list[str] | None = None
) -> Rollouts:
    """Rollouts for given completions (dataset solutions, teacher demonstrations), all tokens trained."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    completion_ids, completion_mask = right_pad(completions, pad_id)
    return Rollouts(
        prompt_ids_BP=prompt_ids,
        prompt_mask_BP=prompt_mask,
        completion_ids_BC=completion_ids,
        completion_mask_BC=completion_mask,
        loss_mask_BC=completion_mask.clone(),
        texts=list(texts or []),
        group_B=list(range(len(prompts))),
    )


def stack_rows(picks: Sequence[tuple[Rollouts, int]], pad_id: int) -> Rollouts:
    """One batch of the given rows of several batches (``(rollouts, row)`` in order): prompts re-padded on the left,
    completions and their masks and log-probs on the right; texts and routes follow, groups are renumbered 0..n-1."""
    prompts, completions, masks, logps, texts = [], [], [], [], []
    for r, i in picks:
        prompts.append(r.prompt_ids_BP[i][r.prompt_mask_BP[i].bool()].tolist())
        n = int(r.completion_mask_BC[i].sum())
        completions.append(r.completion_ids_BC[i, :n].tolist())
        masks.append(r.loss_mask_BC[i, :n].tolist())
        logps.append(r.sampler_logp_BC[i, :n] if r.sampler_logp_BC is not None else torch.zeros(n))
        texts.append(r.texts[i] if r.texts else "")
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    completion_ids, completion_mask = right_pad(completions, pad_id)
    loss_mask, _ = right_pad(masks, 0)
    sampler_logp = torch.zeros(completion_ids.shape, dtype=torch.float32)
    for row, values in enumerate(logps):
        sampler_logp[row, : len(values)] = values.float().cpu()
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, loss_mask, sampler_logp, texts, list(range(len(picks))))


def filter_logits(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k tokens and outside the top-p nucleus to -inf."""
    if top_k and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample_next(
    logits_BV: torch.Tensor, params: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return ``(tokens_B, logp_B)`` under the distribution sampled from.

    Temperature 0 is greedy decoding (log-prob 0 for the chosen token).
    """
    logits_BV = logits_BV.float()
    if params.temperature == 0:
        tokens = logits_BV.argmax(-1)
        return tokens, torch.zeros_like(tokens, dtype=torch.float32)
    filtered = filter_logits(logits_BV / params.temperature, params.top_k, params.top_p)
    logp_BV = filtered.log_softmax(-1)
    tokens = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp_BV.gather(-1, tokens[:, None]).squeeze(-1)


class Sampler(Protocol):
    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingConfig, generator: torch.Generator | None = None, stop: Sequence[str] = (),
    ) -> Rollouts:
        """Complete each tokenised prompt once; the rollouts carry the sampler's own token log-probs. A row also ends
        once its completion's text ends with one of ``stop`` (the stop string's tokens kept, e.g. ``</tool_call>``)."""

    def update_weights(self, model: torch.nn.Module) -> None:
        """Sample from ``model``'s current weights from now on (called after every applied optimizer step)."""

    def close(self) -> None:
        """Release the engine's resources."""


class HFSampler:
    """Batched KV-cached sampling from a local Hugging Face causal LM.

    It samples from the very module it was given, so ``update_weights`` has nothing to copy.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, eos_token_ids: Sequence[int] | None = None, autocast=None):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = torch.tensor(sorted(set(eos_token_ids or [tokenizer.eos_token_id])), dtype=torch.long)
        self.autocast = autocast

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def update_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            raise ValueError("HFSampler samples from the model it was built with; build another for a different model")

    def close(self) -> None:
        pass

    @torch.inference_mode()
    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingConfig, generator: torch.Generator | None = None, stop: Sequence[str] = (),
    ) -> Rollouts:
        if not is_gathered(self.model):  # each sharded forward is a collective; ranks decode different numbers of tokens
            raise RuntimeError("HFSampler needs a sharded model gathered first (sharding.gathered, entered by every rank)")
        device = self.device
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        eos_ids = self.eos_ids.to(device)
        batch = prompt_ids.shape[0]
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                tokens, logps, alive = self._decode(prompt_ids, prompt_mask, params, generator, eos_ids, tuple(stop))
        finally:
            self.model.train(was_training)
        completion_ids = torch.stack(tokens, 1) if tokens else torch.empty(batch, 0, dtype=torch.long, device=device)
        completion_mask = torch.stack(alive, 1).long()
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_id)
        sampler_logp = torch.stack(logps, 1) * completion_mask
        texts = self.tokenizer.batch_decode(completion_ids.tolist(), skip_special_tokens=True)
        return Rollouts(
            prompt_ids_BP=prompt_ids,
            prompt_mask_BP=prompt_mask,
            completion_ids_BC=completion_ids,
            completion_mask_BC=completion_mask,
            loss_mask_BC=completion_mask.clone(),
            sampler_logp_BC=sampler_logp,
            texts=texts,
            group_B=list(range(batch)),
        )

    def _stopped(self, tokens: list[torch.Tensor], finished_B: torch.Tensor, stop: tuple[str, ...]) -> torch.Tensor:
        """Rows still running whose latest tokens now hold a stop string in their text (special tokens not shown, as
        vLLM matches stops; each token is at least one byte, so the last ``bytes of the longest stop`` + 1 tokens
        hold any occurrence the newest token completed)."""
        window = torch.stack(tokens[-(max(len(s.encode()) for s in stop) + 1) :], 1).tolist()
        hits = [
            not done and any(s in self.tokenizer.decode(tail, skip_special_tokens=True) for s in stop)
            for tail, done in zip(window, finished_B.tolist())
        ]
        return torch.tensor(hits, dtype=torch.bool, device=finished_B.device)

    def _autocast(self):
        import contextlib

        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def _decode(self, prompt_ids, prompt_mask, params, generator, eos_ids, stop=()):
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1
        )
        cache_key = cache_argument(self.model)
        cache, logits = returned_cache(out), out.logits[:, -1]
        attention = prompt_mask
        next_position = position_ids[:, -1] + 1
        finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        tokens, logps, alive = [], [], []
        for _ in range(params.max_new_tokens):
            token, logp = sample_next(logits, params, generator)
            alive.append(~finished)
            tokens.append(token)
            logps.append(logp)
            finished = finished | torch.isin(token, eos_ids)
            if stop:
                finished = finished | self._stopped(tokens, finished, stop)
            if bool(finished.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            out = self.model(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=next_position[:, None],
                use_cache=True,
                **{cache_key: cache},
            )
            cache, logits = returned_cache(out), out.logits[:, -1]
            next_position = next_position + 1
        return tokens, logps, alive


def cache_argument(model) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` (transformers >= 5.2x), or the older
    ``past_key_values`` (earlier releases, and remote-code models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
