"""``sampling.engine: hf``: opd's own sampler, batched KV-cached decoding from the student module itself.

It runs any ``AutoModelForCausalLM`` (temperature, top-k, top-p, EOS and stop strings), with the
trainer's own kernels and the weights being trained, so there is nothing to push after an update and
its log-probs are the trainer's (``logprobs = "trainer"``). A sharded student must be gathered first
(``parallel.sharding.gathered``): each sharded forward is a collective, and ranks decode different
numbers of tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Sequence

import torch

from ..config.sections import SamplingConfig
from ..models.rollouts import Rollouts, build_rollouts, left_pad
from ..parallel.sharding import is_gathered
from .base import Engine, Sampler, register_engine


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


class HFSampler(Sampler):
    """Batched KV-cached sampling from a local Hugging Face causal LM.

    It samples from the very module it was given, so ``update_weights`` has nothing to copy.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, eos_token_ids: Sequence[int] | None = None, autocast=None):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = sorted(set(eos_token_ids or [tokenizer.eos_token_id]))
        self.autocast = autocast

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decodes_with(self, module: torch.nn.Module) -> bool:
        return module is self.model

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
            raise RuntimeError("HFSampler needs a sharded model gathered first (parallel.sharding.gathered, entered by every rank)")
        device = self.device
        if generator is not None and not same_device(generator.device, device):  # a teacher on teacher.device, the noise elsewhere
            generator = local_generator(generator, device)
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        eos_ids = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                tokens, logps, alive = self._decode(prompt_ids, prompt_mask, params, generator, eos_ids, tuple(stop))
        finally:
            self.model.train(was_training)
        lengths_B = torch.stack(alive, 1).sum(1).tolist()  # a row's completion: its tokens up to and including EOS
        ids_BC, logps_BC = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
        completions = [row[:n] for row, n in zip(ids_BC, lengths_B)]
        return build_rollouts(
            prompts, completions, self.pad_id, logps=[row[:n] for row, n in zip(logps_BC, lengths_B)],
            texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True), device=device,
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


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when 0 is the current one (a generator made on ``cuda`` says ``cuda``)."""
    def index(d: torch.device):
        return d.index if d.index is not None or d.type != "cuda" else torch.cuda.current_device()

    return a.type == b.type and index(a) == index(b)


def local_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by one draw from ``generator``: the samples stay a function of the run's
    seed, step and micro-batch when the model decodes on another device than the run's noise lives on."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)


def cache_argument(model) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` (transformers >= 5.2x), or the older
    ``past_key_values`` (earlier releases, and remote-code models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@register_engine
class HFEngine(Engine):
    name = "hf"
    takes_stop_strings = True
    holds_weights = False  # it samples from the module being trained
    logprobs = "trainer"

    @classmethod
    def build(cls, cfg, student, tokenizer, eos_ids, autocast, device, context) -> Sampler:
        return HFSampler(student, tokenizer, eos_ids, autocast)
