"""Tasks: where prompts, privileged context and rewards come from. Every module here is imported, so each
registers itself by name (``task.name``)."""

import importlib
import pkgutil

from .base import TASK_REGISTRY, Example, Judge, StepJudge, Task, TaskConfig, TurnJudge, register_task
from .reward_functions import build_graded_task as build_task

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .arithmetic import ArithmeticTask  # noqa: E402
from .math import DataError, MathTask  # noqa: E402

__all__ = [
    "TASK_REGISTRY", "ArithmeticTask", "DataError", "Example", "Judge", "MathTask", "StepJudge", "Task", "TaskConfig", "TurnJudge",
    "build_task", "register_task",
]
