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

# The method section: the shared keys plus one subsection per registered method (``method.<name>.*``).
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig",
    [("name", Literal[tuple(METHOD_REGISTRY)], field(default="opd"))]
    + [(name, cls.config_class, field(default_factory=cls.config_class)) for name, cls in METHOD_REGISTRY.items() if cls.config_class],
    bases=(MethodCommonConfig,),
)
MethodConfig.__module__ = __name__

# The sampling section: the shared keys plus one subsection per registered engine that has keys (``sampling.<engine>.*``).
SamplingSection = dataclasses.make_dataclass(
    "SamplingSection",
    [("engine", Literal[tuple(ENGINE_REGISTRY)], field(default="hf"))]
    + [(name, cls.config_class, field(default_factory=cls.config_class)) for name, cls in ENGINE_REGISTRY.items() if cls.config_class],
    bases=(SamplingConfig,),
)
SamplingSection.__module__ = __name__


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


