"""Code generation (``task.name: code``): the completion's program, run in a sandbox against its row's tests.

Rows come from the same files as the users'-data task (``tasks.math``: JSONL, JSON, Parquet, saved or cached
``datasets``; prompts, problems or conversations) and carry their tests in one of two shapes:

- **a function** (HumanEval, MBPP): ``test`` (``task.test_field``) is test code — HumanEval's ``def check(candidate)``,
  called with the row's ``entry_point`` (``task.entry_point_field``), or plain asserts — or a list of assert statements
  (MBPP's ``test_list``), each its own test;
- **a program on stdin** (APPS, CodeContests, LiveCodeBench): ``inputs`` and ``outputs`` (``task.inputs_field``,
  ``task.outputs_field``), lists of strings, one test per pair.

The program is the completion's last fenced code block (or ``task.code_pattern``'s last match). Its reward is 1 when it
passes every test and 0 otherwise (``task.reward: pass_all``), or the share of tests it passes (``pass_fraction``);
each step logs why the others failed (``code/wrong``, ``code/timeout``, ``code/no_code``, …: shares of the programs).
Every program runs in ``sandbox.Sandbox`` (``task.sandbox.*``; docs/sandbox.md). Evaluation reports ``pass@1`` (the
greedy program passes every test) and, with ``eval.k``, ``pass@k``. A row without tests is refused when the data is
read, naming the file, the row and the fields looked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

from ..config.sections import require
from ..sandbox.checks import RowTests, check_all, extract_program
from ..sandbox.isolation import ISOLATIONS, Limits, SandboxUnavailable
from ..sandbox.run import Sandbox
from .base import Example, register_task
from .math import MathConfig, MathTask
from .rows import DataError

log = logging.getLogger(__name__)

FUNCTION_INSTRUCTION = "Write the Python code, complete and runnable, in one ```python code block."
PROGRAM_INSTRUCTION = (
    "Write a Python program that reads the input from standard input and prints the answer to standard output, "
    "in one ```python code block."
)
CODE_TEACHER_INSTRUCTION = "Here is a reference solution:\n{solution}\n\nNow write your own solution, in one ```python code block."
CHECK_FUNCTION = re.compile(r"^\s*def\s+check\s*\(", re.MULTILINE)  # HumanEval's test code: called with the entry point
REASONS = ("passed", "wrong", "no_code", "error", "memory", "timeout", "cpu_time", "disk", "output_limit", "killed", "sandbox_error")


@dataclass
class SandboxConfig:
    """``task.sandbox``: how programs are isolated and what each may use (docs/sandbox.md)."""

    isolation: Literal["namespaces", "limits_only"] = "namespaces"  # limits_only: no namespaces (say so knowingly)
    workers: int | None = None  # programs run at once; None = this machine's CPUs shared by the ranks on it
    python: str | None = None  # the interpreter programs run with; None = the base interpreter of the one running opd
    site_packages: bool = False  # let programs import the interpreter's installed packages (else the standard library only)
    deadline: float = 10.0  # wall-clock seconds per run, after which all its processes are killed
    cpu_seconds: int = 10
    memory_mb: int = 1024  # address space
    disk_mb: int = 64  # the writable /tmp, and the largest file
    processes: int = 32  # processes and threads at once
    open_files: int = 64
    output_kb: int = 1024  # stdout and stderr together; more stops the program

    def limits(self) -> Limits:
        return Limits(self.deadline, self.cpu_seconds, self.memory_mb, self.disk_mb, self.processes, self.open_files, self.output_kb)

    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@dataclass
class CodeConfig(MathConfig):
    """``task.name: code``: the users'-data keys (``tasks.math``), the tests' fields, the reward and the sandbox."""

    name: str = "code"
    test_field: str = "test"  # a function row's tests: test code, or a list of assert statements
    entry_point_field: str = "entry_point"  # the function HumanEval's check(candidate) is called with
    inputs_field: str = "inputs"  # a program row's stdin of each test
    outputs_field: str = "outputs"  # and the stdout it must print
    code_pattern: str | None = None  # a regex whose last match (its first group, if any) is the program
    reward: Literal["pass_all", "pass_fraction"] = "pass_all"
    group_field: str | None = None  # a row field (e.g. a family, a difficulty): held-out pass@1 per value too (pass@1_<value>)
    answer_from_solution: bool = False  # (a reference program holds no \boxed{} answer)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def validate(self, cfg: Any) -> None:
        super().validate(cfg)
        require(self.answer_pattern is None, "task.answer_pattern", "does not apply to task.name=code (the program is the last fenced code block, or task.code_pattern)")
        if self.code_pattern is not None:
            try:
                re.compile(self.code_pattern)
            except re.error as err:
                require(False, "task.code_pattern", f"is not a valid regular expression ({err})")
        b = self.sandbox
        require(b.isolation in ISOLATIONS, "task.sandbox.isolation", f"must be one of {', '.join(ISOLATIONS)}")
        require(b.workers is None or b.workers >= 1, "task.sandbox.workers", f"must be >= 1 or null, got {b.workers}")
        for key in ("deadline", "cpu_seconds", "memory_mb", "disk_mb", "processes", "open_files", "output_kb"):
            require(getattr(b, key) > 0, f"task.sandbox.{key}", f"must be > 0, got {getattr(b, key)}")


def row_tests(example: Example, c: CodeConfig) -> RowTests:
    """The tests a row carries (``DataError`` naming the row when it has none, or they are malformed)."""
    row = example.meta.get("row") if isinstance(example.meta.get("row"), dict) else {}
    where = example.meta.get("source", "a row")
    test, inputs, outputs = row.get(c.test_field), row.get(c.inputs_field), row.get(c.outputs_field)
    if test is not None:
        if isinstance(test, list) and test and all(isinstance(t, str) and t.strip() for t in test):
            return RowTests(statements=tuple(test))
        if isinstance(test, str) and test.strip():
            entry = row.get(c.entry_point_field)
            defines_check = CHECK_FUNCTION.search(test) is not None
            if defines_check and not isinstance(entry, str):
                raise DataError(f"{where}: '{c.test_field}' defines check(candidate) but the row has no '{c.entry_point_field}' naming the function to check")
            return RowTests(statements=(f"{test}\n\ncheck({entry})\n" if defines_check else test,))
        raise DataError(f"{where}: '{c.test_field}' must be test code (a string) or a list of assert statements, got {type(test).__name__}")
    if inputs is not None or outputs is not None:
        if not (isinstance(inputs, list) and isinstance(outputs, list) and inputs and len(inputs) == len(outputs)
                and all(isinstance(x, str) for x in inputs + outputs)):
            raise DataError(f"{where}: '{c.inputs_field}' and '{c.outputs_field}' must be lists of strings of the same, non-zero length")
        return RowTests(cases=tuple(zip(inputs, outputs)))
    raise DataError(
        f"{where}: no tests: a function row needs '{c.test_field}' (test code or a list of asserts), a program row "
        f"'{c.inputs_field}' and '{c.outputs_field}' (task.test_field, task.inputs_field, task.outputs_field name them)"
    )


@register_task("code", CodeConfig)
@dataclass
class CodeTask(MathTask):
    """The user's code rows (``tasks.math`` reads them), graded by running their programs (module docstring)."""

    name: str = "code"

    @classmethod
    def from_config(cls, c: CodeConfig, seed: int = 0) -> "CodeTask":
        return cls(path=c.path, config=c, seed=seed)

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.config
        self._train = [self._with_tests(e) for e in self._train]
        self._eval = [self._with_tests(e) for e in self._eval]
        self._code_pattern = re.compile(c.code_pattern) if c.code_pattern else None
        try:
            self.sandbox = Sandbox(c.sandbox.isolation, c.sandbox.limits(), c.sandbox.worker_count(), c.sandbox.python, c.sandbox.site_packages)
        except SandboxUnavailable as err:
            raise DataError(str(err)) from None

    def _with_tests(self, example: Example) -> Example:
        tests = row_tests(example, self.config)
        kind = "function" if tests.statements else "program"
        return replace(example, answer=json.dumps({"tests": tests.count}), meta={**example.meta, "tests": tests, "kind": kind})

    def grade(self, completions: Sequence[str], examples: Sequence[Example]) -> list:
        programs = [extract_program(c, self._code_pattern) for c in completions]
        return check_all(self.sandbox, programs, [e.meta["tests"] for e in examples])

    def score(self, verdict) -> float:
        if self.config.reward == "pass_fraction":
            return verdict.passed / verdict.total if verdict.total else 0.0
        return float(verdict.all_passed)

    def reward(self, completion: str, example: Example) -> float:
        return self.score(self.grade([completion], [example])[0])

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[list[float], dict[str, float]]:
        verdicts = self.grade(completions, examples)
        n = max(len(verdicts), 1)
        metrics = {f"code/{reason}": sum(v.reason == reason for v in verdicts) / n for reason in REASONS}
        metrics["code/tests_passed"] = sum(v.passed / v.total for v in verdicts if v.total) / n
        return [self.score(v) for v in verdicts], {k: v for k, v in metrics.items() if v or k in ("code/passed", "code/tests_passed")}

    def eval_metrics(self, example: Example, completion: str, reward: float) -> dict[str, float]:
        passed = float(reward >= 1.0)
        group = (example.meta.get("row") or {}).get(self.config.group_field) if self.config.group_field else None
        return {"pass@1": passed, **({f"pass@1_{group}": passed} if isinstance(group, (str, int)) else {})}

    def _instruction(self, example: Example) -> str:
        if self.config.instruction is not None:
            return self.config.instruction
        return FUNCTION_INSTRUCTION if example.meta.get("kind") == "function" else PROGRAM_INSTRUCTION

    def privileged_messages(self, example: Example) -> list[dict]:
        if self.config.privileged_instruction is None and example.solution is not None:
            return self._base_messages(example, CODE_TEACHER_INSTRUCTION.replace("{solution}", example.solution))
        return super().privileged_messages(example)
