"""The state a training step reads: the config, the task, the student, its sampler, teachers, judge, timer.

Built by ``assemble.build_session``; passed to a method's ``data`` and ``loss`` as ``s``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import Config
from .distributed import SINGLE, Ranks
from .judges import Judge
from .methods import Method
from .profiling import PhaseTimer
from .rollout import Sampler
from .tasks.base import Task
from .teachers import Teacher


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass
class Session:
    cfg: Config
    method: Method  # the configured method: its batches and its loss
    task: Task
    tokenizer: object  # the student's tokenizer (a transformers tokenizer)
    student: torch.nn.Module
    sampler: Sampler  # samples from the student
    teacher: Teacher | None
    teacher_sampler: Sampler | None  # samples from the teacher (teacher demonstrations, seq-KD)
    reference: Teacher | None  # π_ref, for methods that need one
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    max_prompt_tokens: int | None = None
    judge: Judge | None = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # seconds per phase of the current step
    data_report: dict = field(default_factory=dict)  # what the pre-flight pass kept, skipped and truncated per split
    ranks: Ranks = SINGLE  # this process's place in a several-process run (one process: SINGLE)
    sampler_behind: bool = False  # updates applied since the sampler last got the student's weights (sampling.sync_every)
