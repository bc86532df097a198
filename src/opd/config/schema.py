"""The whole run's configuration as one tree of plain dataclasses: the generic sections (``config.sections``), the
``task`` section of the task ``task.name`` names (its fields are that task's, ``tasks/``), the ``sampling`` section
with one subsection per registered engine that has keys (``engines/``) and the ``method`` section with one subsection
per registered method (``methods/``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..engines.base import ENGINE_REGISTRY
from ..methods.base import METHOD_REGISTRY
from ..tasks.base import TASK_REGISTRY, TaskConfig
from .sections import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    MethodCommonConfig,
    PairingConfig,
    RunConfig,
    SamplingConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

DEFAULT_TASK = "arithmetic"

def with_subsections(name: str, base: type, picker: str, default: str, registry: dict) -> type:
    """Section ``base`` whose ``picker`` key names one entry of ``registry`` (a ``Literal`` of its names), with one
    subsection per entry that has keys (its ``config_class``), under the entry's name."""
    section = dataclasses.make_dataclass(
        name,
        [(picker, Literal[tuple(registry)], field(default=default))]
        + [(key, cls.config_class, field(default_factory=cls.config_class)) for key, cls in registry.items() if cls.config_class],
        bases=(base,),
    )
    section.__module__ = __name__
    return section


MethodConfig = with_subsections("MethodConfig", MethodCommonConfig, "name", "opd", METHOD_REGISTRY)  # method.<name>.*
SamplingSection = with_subsections("SamplingSection", SamplingConfig, "engine", "hf", ENGINE_REGISTRY)  # sampling.<engine>.*


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TASK_REGISTRY[DEFAULT_TASK].config_class)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


