"""Tasks: where prompts, privileged context and rewards come from."""

from .arithmetic import ArithmeticTask
from .base import Example, Task
from .math import DataError, MathTask

__all__ = ["ArithmeticTask", "DataError", "Example", "MathTask", "Task"]
