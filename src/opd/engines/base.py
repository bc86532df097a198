"""What a sampler is, and the registry of the engines ``sampling.engine`` picks from.

A ``Sampler`` turns token-id prompts into ``Rollouts`` (with its own log-probs of the tokens it
sampled), takes the student's new weights after an update (``update_weights``) and releases its
resources at the end (``close``). It declares ``eos_ids``, the ids that end a turn, which the episode
driver reads.

An ``Engine`` is a kind of student sampler that a config can name (``sampling.engine: hf`` or
``vllm``). Each is one module in ``engines/`` that subclasses ``Engine``, owns its config section
(``sampling.<name>``, ``config_class``) and its checks (``validate``), says how to build its sampler
(``build``) and declares what it supports:

- ``takes_stop_strings``: a turn can end at a stop string (what tool-using episodes need);
- ``holds_weights``: it samples from its own copy of the weights, which the loop pushes every
  ``sampling.sync_every`` steps (``hf`` samples from the module being trained: nothing to push);
- ``logprobs``: ``"trainer"`` when its sampled-token log-probs are the trainer's own (same module,
  same kernels, same weights), ``"engine"`` when they come from other kernels (and, between pushes,
  older weights), so the truncated importance weight is on by default (``method.is_correction_cap``);
- ``runs_apart``: it generates in a process of its own, so a step's rows can be generated while the
  trainer trains (``sampling.max_staleness``).

Two members have defaults, which a sampler inherits by subclassing ``Sampler``: ``finish_round()``, which
the loop calls (through ``sampling_round``) at the end of each phase that samples, so that ranks sharing
one engine generate together (``engines.lockstep``); and ``decodes_with(module)``, true for a sampler that
decodes with the module being trained (a sharded student is then gathered for it).

``@register_engine`` files it under its name; the package imports every module in it. Nothing outside
an engine's module compares ``sampling.engine`` with a name (a test checks this).
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator, Literal, Protocol, Sequence

import torch

from ..config.sections import Registry, SamplingConfig
from ..models.rollouts import Rollouts
from ..parallel.sharding import gathered

AnyConfig = Any  # the whole opd.config.schema.Config (not imported: it is assembled from this registry)


class Sampler(Protocol):
    eos_ids: list[int]  # the ids that end a completion (a turn), sorted

    def sample(
        self, prompts: Sequence[Sequence[int]], params: SamplingConfig, generator: torch.Generator | None = None, stop: Sequence[str] = (),
    ) -> Rollouts:
        """Complete each tokenised prompt once; the rollouts carry the sampler's own token log-probs. A row also ends
        once its completion's text ends with one of ``stop`` (the stop string's tokens kept, e.g. ``</tool_call>``);
        only a sampler whose engine ``takes_stop_strings`` is given any."""

    def update_weights(self, model: torch.nn.Module) -> None:
        """Sample from ``model``'s current weights from now on (called after every applied optimizer step)."""

    def close(self) -> None:
        """Release the engine's resources."""

    def finish_round(self) -> None:
        """The end of a phase that sampled (``sampling_round``): a sampler whose engine is shared by several ranks
        serves their requests until they have all finished (``engines.lockstep``); nothing for the others."""
        return None

    def decodes_with(self, module: torch.nn.Module) -> bool:
        """Whether it decodes with ``module`` itself (opd's own sampler), rather than with its own copy of the weights."""
        return False


class Engine:
    """Base class of every registered engine. Subclasses set ``name`` (and ``config_class``, the declarations) and
    implement ``build``."""

    name: ClassVar[str]
    config_class: ClassVar[type | None] = None  # the dataclass of the ``sampling.<name>`` section
    takes_stop_strings: ClassVar[bool] = False
    holds_weights: ClassVar[bool] = True
    logprobs: ClassVar[Literal["trainer", "engine"]] = "engine"
    runs_apart: ClassVar[bool] = False  # it generates in a process of its own, so it can while the trainer trains

    @classmethod
    def section(cls, cfg: AnyConfig):
        """This engine's own config section, ``cfg.sampling.<name>``."""
        return getattr(cfg.sampling, cls.name)

    @classmethod
    def validate(cls, cfg: AnyConfig, world_size: int) -> None:
        """Refuse what this engine cannot do with ``cfg`` on ``world_size`` ranks, raising ``ConfigError`` naming the key
        (called once, with the rest of the config's checks, before any model loads)."""

    @classmethod
    def build(cls, cfg: AnyConfig, student: torch.nn.Module, tokenizer, eos_ids: list[int], autocast, device: torch.device,
              context: int | None) -> Sampler:
        """The student's sampler (``context``: the run's context length, None when unknown)."""
        raise NotImplementedError


ENGINE_REGISTRY = Registry("sampling.engine", "engine")  # name -> Engine subclass


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator: file ``cls`` under ``cls.name``."""
    return ENGINE_REGISTRY.add(cls.name, cls)


def engine_class(name: str) -> type[Engine]:
    return ENGINE_REGISTRY.named(name)


def row_seeds(generator: torch.Generator | None, rows: int) -> list[int]:
    """One seed per row, drawn in order from ``generator`` (the micro-batch's): an engine that seeds each request
    samples, like opd's own sampler, as a function of the run's seed, the step and the micro-batch only."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**31 - 1, (rows,), generator=generator, device=device).tolist()


@contextlib.contextmanager
def sampling_round(sampler: Sampler | None) -> Iterator[None]:
    """A phase in which ``sampler`` is asked for samples any number of times (a training step's sampling, an
    evaluation); on leaving it, a sampler whose engine is shared by several ranks serves their requests until
    they have all left too (``engines.lockstep``), also when this rank leaves with an error that
    ``ranks.gather`` will pass to the others. Entered by every rank."""
    try:
        yield
    finally:
        if sampler is not None:
            sampler.finish_round()


def whole_for(sampler: Sampler | None, module: torch.nn.Module):
    """A context in which ``sampler`` can decode: a sharded ``module`` gathered whole where ``sampler`` decodes with
    it (opd's own sampler; each rank then decodes with no collectives, ``parallel.sharding.gathered``); nothing
    where it holds its own copy of the weights (an engine). Entered by every rank."""
    return gathered(module) if sampler is not None and sampler.decodes_with(module) else contextlib.nullcontext()
