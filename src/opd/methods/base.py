"""What a method is, what it reads (the ``Session``), what it needs, and the registry of methods by name.

A method is one module in ``methods/``: a ``Method`` subclass that owns its config section
(``method.<name>``), what it refuses (``validate``), what it needs from the run (``needs``:
a teacher, a reference, a judge, privileged context, …), where a batch's completions come
from (``data``; by default the student's own samples, ``student_samples`` below) and which pure
objective scores them (``loss``). ``@register`` files it under its name; the package imports every
module in it, so a new method touches only its own file (and a config, a test and docs). Nothing
outside a method's module tests its name.

The run's config is passed as a whole (``opd.config.schema.Config``, not imported here: it builds
its ``method`` section from this registry).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch

from ..config.sections import Registry
from ..engines.base import Sampler, engine_class
from ..episodes.driver import run_task_episodes, template_kwargs_with_tools
from ..episodes.environments import is_episodic
from ..models.prompts import PromptError, encode_prompt
from ..models.rollouts import Rollouts
from ..objectives.common import Normaliser
from ..parallel.ranks import SINGLE, Ranks
from ..tasks.base import Example, Judge, StepJudge, Task, TurnJudge
from ..teachers.base import Teacher
from .batch import Batch

AnyConfig = Any  # the whole opd.config.schema.Config

DEFAULT_IMPORTANCE_CAP = 5.0  # docs/methods.md, "The shared update rule"


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
    spans: bool = False  # its loss can take a teacher with a tokenizer of its own (teacher.tokenizer=own): spans, or GKD's hybrid


class Method:
    """Base class of every method. Subclasses set ``name`` and ``config_class`` and override what differs."""

    name: ClassVar[str]
    config_class: ClassVar[type | None] = None  # the dataclass of the ``method.<name>`` section

    def __init__(self, cfg: AnyConfig):
        self.cfg = cfg
        self.config = getattr(cfg.method, self.name) if self.config_class is not None else None

    @classmethod
    def section(cls, cfg: AnyConfig):
        """This method's own config section, ``cfg.method.<name>``."""
        return getattr(cfg.method, cls.name)

    @classmethod
    def validate(cls, cfg: AnyConfig) -> None:
        """Refuse impossible values and meaningless combinations, raising ``ConfigError`` naming the key."""

    @classmethod
    def needs(cls, cfg: AnyConfig) -> Needs:
        return Needs()

    @classmethod
    def loss_temperature(cls, cfg: AnyConfig) -> tuple[str, float]:
        """``(config key, τ)`` of the temperature a full-vocabulary loss divides both logit sets by."""
        return "sampling.temperature", cfg.sampling.temperature

    @classmethod
    def default_reduction(cls, cfg: AnyConfig) -> str:
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
        """The truncated importance weight's cap: configured, or 5 when the sampler truncates (top-p / top-k) or its
        engine's log-probs are not the trainer's (other kernels and, between weight pushes, older weights)."""
        m, sampling = self.cfg.method, self.cfg.sampling
        if m.is_correction_cap is not None:
            return m.is_correction_cap
        differs = sampling.top_p < 1 or sampling.top_k > 0 or engine_class(sampling.engine).logprobs != "trainer"
        return DEFAULT_IMPORTANCE_CAP if differs else None

    def tokens_per_row(self) -> int:
        """The constant normaliser's tokens per row: ``method.normalizer_tokens``, else the most a row can hold (an
        episodic task's rows run to its episode budget, not one turn's ``sampling.max_new_tokens``)."""
        return self.cfg.method.normalizer_tokens or self.cfg.task.completion_budget(self.cfg.sampling.max_new_tokens)

    def normaliser(self, batch: Batch) -> Normaliser:
        """What ``batch``'s per-token terms are divided by: the step's normaliser (set by the loop), or this batch's."""
        return batch.normaliser_for(self.reduction(), self.tokens_per_row())

    def row_advantages(self, batch: Batch) -> torch.Tensor | None:
        """``[B]`` per-row advantages that need each row's whole group (a group baseline), or None when the method
        has none. The loop computes them on each batch as sampled, before its rows may be regrouped into
        micro-batches by token budget (``train.micro_batch_tokens``), and keeps them on ``batch.advantages_B``."""
        return None

    def advantages(self, batch: Batch) -> torch.Tensor:
        """The batch's per-row advantages: the ones the loop kept, or (outside a training step) computed now."""
        return batch.advantages_B if batch.advantages_B is not None else self.row_advantages(batch)

    def prepare_step(self, s: Session, batches: list[Batch], step: int) -> dict[str, float]:
        """Called with all of this rank's training micro-batches of a step before any loss: a method that selects
        tokens across the whole step (REOPOLD) sets each batch's ``train_mask_BC`` here. Returns the step's own
        metrics (reported once per step)."""
        return {}

    def make_teacher(self, student: torch.nn.Module, autocast, device: torch.device) -> Teacher | None:
        """The teacher, for methods whose ``needs`` say the student is its own teacher."""
        return None

    def make_judge(self, task: Task, teacher: Teacher | None, device: torch.device) -> Judge | StepJudge | TurnJudge | None:
        """The verbal judge, for methods whose ``needs`` ask for one."""
        return None

    def data(self, s: Session, examples: list[Example], rng: random.Random, generator: torch.Generator) -> Batch:
        """The batch's completions. Default: the student's own samples."""
        return student_samples(s, examples, generator)

    def loss(self, s: Session, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class Timer(Protocol):
    """Where a step's time goes (``training.profiling.PhaseTimer``): time inside ``phase(name)`` is that phase's."""

    def phase(self, name: str) -> contextlib.AbstractContextManager: ...

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last ``pop``."""

    failed_in: str | None  # the innermost phase an exception left since the last ``pop``


@dataclass
class Session:
    """The state a step reads, passed to a method's ``data`` and ``loss`` as ``s``; built by
    ``training.assembly.build_session``. ``context`` is the run's context length (prompt + completion tokens: the
    shortest of the student's and its teachers'; None when none states one), ``max_prompt_tokens`` what it leaves a
    training prompt."""

    cfg: AnyConfig
    method: Method  # the configured method: its batches and its loss
    task: Task
    tokenizer: Any  # the student's tokenizer (a transformers tokenizer)
    student: torch.nn.Module
    sampler: Sampler  # samples from the student
    teacher: Teacher | None
    teacher_sampler: Sampler | None  # samples from the teacher (teacher demonstrations, seq-KD)
    reference: Teacher | None  # π_ref, for methods that need one
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    timer: Timer  # seconds per phase of the current step
    context: int | None = None
    judge: Judge | StepJudge | TurnJudge | None = None
    data_report: dict = field(default_factory=dict)  # what the pre-flight pass kept, skipped and truncated per split
    ranks: Ranks = SINGLE  # this process's place in a several-process run (one process: SINGLE)
    sampler_behind: bool = False  # updates applied since the sampler last got the student's weights (sampling.sync_every)
    # a remote teacher's or reference's failure in the current step (``Teacher.take_failure``): the step is skipped
    # on every rank and the run stops at its boundary (training.loop)
    service_failure: Exception | None = None
    # the engine's failure to take the weights after a finished step (its server stopped answering): the run stops
    # at that step's boundary, with a checkpoint (training.loop)
    sync_failure: Exception | None = None
    pipeline: Any = None  # where each step's rows come from (training.rollout_pipeline.RolloutPipeline), set by the loop

    @property
    def max_prompt_tokens(self) -> int | None:
        """The most prompt tokens a training prompt may have: the context less ``sampling.max_new_tokens`` (None when the
        context is unknown)."""
        return self.context - self.cfg.sampling.max_new_tokens if self.context else None


# ----------------------------------------------------------------------------- the default data source


def encode_prompts(s: Session, examples: list[Example], privileged: bool = False) -> list[list[int]]:
    """Token ids of each example's prompt (the privileged one: problem + reference solution), naming any that fails."""
    messages = s.task.privileged_messages if privileged else s.task.messages
    episodic = is_episodic(s.task)
    encoded = []
    for e in examples:
        kwargs = s.cfg.task.chat_template_kwargs
        if episodic:  # an episode's prompt lists its environment's tools, as the sampled one did
            kwargs = template_kwargs_with_tools(kwargs, s.task.environment(e).tools())
        try:
            encoded.append(encode_prompt(s.tokenizer, messages(e), s.max_prompt_tokens, kwargs))
        except PromptError as err:
            where = e.meta.get("source") or repr(e.prompt[:40])
            raise PromptError(f"{where}: {err} (sampling.max_new_tokens={s.cfg.sampling.max_new_tokens})") from None
    return encoded


def student_samples(s: Session, examples: list[Example], generator: torch.Generator) -> Batch:
    """``sampling.samples_per_prompt`` completions of each example by the student, graded by the task once."""
    k = s.cfg.sampling.samples_per_prompt
    rows = [e for e in examples for _ in range(k)]
    rollouts, rewards, info, rows = sample_rows(s, s.sampler, rows, generator)
    rollouts.group_B = [i // k for i in range(len(rows))]  # rows of one prompt share a group
    rollouts.route_B = [e.meta.get("teacher") for e in rows]
    return Batch(rollouts, rows, on_policy=True, rewards=rewards, info=info)


def sample_rows(
    s: Session, sampler: Sampler, rows: list[Example], generator: torch.Generator, grade: bool = True,
) -> tuple[Rollouts, list[float] | None, dict[str, float], list[Example]]:
    """``(rollouts, rewards, metrics, rows)`` of ``sampler`` on ``rows``: one completion each, graded by the task
    (unless ``grade`` is false: rewards None); or, for a task whose examples are environments (multi-turn tools), one
    whole episode each, graded by its environment, each row's example then carrying the episode it played
    (``Episodes.played``)."""
    if is_episodic(s.task):
        episodes = run_task_episodes(s.task, rows, sampler, s.tokenizer, s.cfg.sampling, generator, s.cfg.task.chat_template_kwargs, s.context)
        return episodes.rollouts.to(s.device), episodes.rewards, episodes.metrics(), episodes.played(rows)
    rollouts = sampler.sample(encode_prompts(s, rows), s.cfg.sampling, generator).to(s.device)  # a teacher's may be elsewhere
    if not grade:
        return rollouts, None, {}, rows
    rewards, metrics = s.task.rewards(rollouts.texts, rows)
    return rollouts, rewards, metrics, rows


METHOD_REGISTRY = Registry("method.name", "method")  # name -> Method subclass


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: file ``cls`` under ``cls.name``."""
    return METHOD_REGISTRY.add(cls.name, cls)


def method_class(name: str) -> type[Method]:
    return METHOD_REGISTRY.named(name)


def create_method(cfg: AnyConfig) -> Method:
    """The configured method, ready to make batches and losses."""
    return method_class(cfg.method.name)(cfg)
