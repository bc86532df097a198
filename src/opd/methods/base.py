"""What a method is, what it needs, and the registry of methods by name.

A method is one module in ``methods/``: a ``Method`` subclass that owns its config section
(``method.<name>``), what it refuses (``validate``), what it needs from the run (``needs``:
a teacher, a reference, a judge, privileged context, …), where a batch's completions come
from (``data``) and which pure objective scores them (``loss``). ``@register`` files it under
its name; the package imports every module in it, so a new method touches only its own
file (and a config, a test and docs). Nothing outside a method's module tests its name.

The run's config is passed as a whole (``opd.config.Config``, not imported here:
``config.py`` builds its ``method`` section from this registry).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..sections import ConfigError
from ..tasks.base import Example
from ..objectives.common import Normaliser
from .data import Batch, student_samples

RunConfig = Any  # the whole opd.config.Config

DEFAULT_IMPORTANCE_CAP = 5.0  # METHODS.md, "The shared update rule"


@dataclass(frozen=True)
class Needs:
    """What a configured method needs from the run; the loop and its set-up act on this, never on a name."""

    teacher: bool = False  # teacher.path: a separate model that scores (and can sample) completions
    self_teacher: bool = False  # the student itself is the teacher (Method.make_teacher builds it)
    reference: str | None = None  # π_ref: "student_init" or a checkpoint path
    reference_key: str = "reference"  # the config key that names a checkpoint reference (for its loading errors)
    judge: bool = False  # a verbal judge (Method.make_judge)
    solutions: bool = False  # training examples must carry a reference solution
    answers: bool = False  # training rewards grade against each example's answer: every training row needs one
    privileged: bool = False  # the teacher reads the reference solution in its prompt
    full_vocabulary: bool = False  # the teacher's whole next-token distribution (pairing checks output sizes)
    group: bool = False  # a group baseline: at least 2 samples per prompt
    routable: bool = False  # accepts per-example teacher routes (teacher.routes)


class Method:
    """Base class of every method. Subclasses set ``name`` and ``config_class`` and override what differs."""

    name: ClassVar[str]
    config_class: ClassVar[type | None] = None  # the dataclass of the ``method.<name>`` section

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.config = getattr(cfg.method, self.name) if self.config_class is not None else None

    @classmethod
    def section(cls, cfg: RunConfig):
        """This method's own config section, ``cfg.method.<name>``."""
        return getattr(cfg.method, cls.name)

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        """Refuse impossible values and meaningless combinations, raising ``ConfigError`` naming the key."""

    @classmethod
    def needs(cls, cfg: RunConfig) -> Needs:
        return Needs()

    @classmethod
    def loss_temperature(cls, cfg: RunConfig) -> tuple[str, float]:
        """``(config key, τ)`` of the temperature a full-vocabulary loss divides both logit sets by."""
        return "sampling.temperature", cfg.sampling.temperature

    @classmethod
    def default_reduction(cls, cfg: RunConfig) -> str:
        """The normaliser ``method.reduction: auto`` stands for."""
        return "token_mean"

    def reduction(self) -> str:
        """The configured normaliser, ``auto`` resolved."""
        r = self.cfg.method.reduction
        return self.default_reduction(self.cfg) if r == "auto" else r

    def student_temperature(self) -> float:
        """The temperature of the policy that sampled: the student's log-probs in every sampled-token estimator
        are those of ``softmax(logits / τ)`` (τ = 1 for greedy sampling, which has no density to match)."""
        return self.cfg.sampling.temperature or 1.0

    def importance_cap(self) -> float | None:
        """The truncated importance weight's cap: configured, or 5 when the sampler truncates (top-p / top-k) or is
        an inference engine (its log-probs come from other kernels and, between weight pushes, older weights)."""
        m, sampling = self.cfg.method, self.cfg.sampling
        if m.is_correction_cap is not None:
            return m.is_correction_cap
        differs = sampling.top_p < 1 or sampling.top_k > 0 or sampling.engine != "hf"
        return DEFAULT_IMPORTANCE_CAP if differs else None

    def tokens_per_row(self) -> int:
        """The constant normaliser's tokens per row."""
        # an episodic task's rows run to its episode budget (task.max_tokens), not one turn's max_new_tokens
        return self.cfg.method.normalizer_tokens or getattr(self.cfg.task, "max_tokens", None) or self.cfg.sampling.max_new_tokens

    def normaliser(self, batch: Batch) -> Normaliser:
        """What ``batch``'s per-token terms are divided by: the step's normaliser (set by the loop), or this batch's."""
        return batch.normaliser_for(self.reduction(), self.tokens_per_row())

    def prepare_step(self, s, batches: list[Batch], step: int) -> None:
        """Called with all of a step's micro-batches before any loss: a method that selects tokens across the
        whole step (REOPOLD) sets each batch's ``train_mask_BC`` here."""

    def make_teacher(self, student: torch.nn.Module, autocast, device: torch.device):
        """The teacher, for methods whose ``needs`` say the student is its own teacher."""
        return None

    def make_judge(self, task, teacher, device: torch.device):
        """The verbal judge, for methods whose ``needs`` ask for one."""
        return None

    def data(self, s, examples: list[Example], rng: random.Random, generator: torch.Generator) -> Batch:
        """The batch's completions. Default: the student's own samples."""
        return student_samples(s, examples, generator)

    def loss(self, s, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: file ``cls`` under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' is registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"config key 'method.name' must be one of {', '.join(repr(n) for n in METHODS)}, got {name!r}")
    return METHODS[name]


def create_method(cfg: RunConfig) -> Method:
    """The configured method, ready to make batches and losses."""
    return method_class(cfg.method.name)(cfg)
