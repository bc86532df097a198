"""A real-user task: math problems from JSONL (or a ``datasets`` dataset), graded by math-verify.

Each row needs a problem and an answer; a worked solution is optional (it is the privileged
context for self-distillation and the SFT target). Field names are configurable. The
student is asked to reason step by step and put the final answer in ``\\boxed{}``.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sections import require
from .base import Example, TaskConfig, register_task

log = logging.getLogger(__name__)

STUDENT_INSTRUCTION = "Reason step by step, and put your final answer in \\boxed{}."
TEACHER_INSTRUCTION = (
    "Here is a reference solution:\n{solution}\n\n"
    "Now give your own step-by-step reasoning that reaches the same answer. "
    "Put your final answer in \\boxed{{}}."
)


class DataError(ValueError):
    """A malformed data file; the message names the file, line and field."""


def read_jsonl(
    path: str | Path, problem_field: str, answer_field: str, solution_field: str | None, teacher_field: str | None = None
) -> list[Example]:
    """Read ``path`` into Examples, refusing malformed rows with file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        examples.append(_row_to_example(row, f"{path}:{line_no}", problem_field, answer_field, solution_field, teacher_field))
    if not examples:
        raise DataError(f"{path}: contains no rows")
    return examples


def _row_to_example(
    row: dict, where: str, problem_field: str, answer_field: str, solution_field: str | None, teacher_field: str | None = None
) -> Example:
    fields = [(problem_field, True), (answer_field, True)] + ([(solution_field, False)] if solution_field else [])
    fields += [(teacher_field, True)] if teacher_field else []
    values = {}
    for name, required in fields:
        value = row.get(name)
        if value is None:
            if required:
                raise DataError(f"{where}: missing field '{name}' (row has: {', '.join(sorted(row)) or 'no fields'})")
            continue
        if isinstance(value, (int, float)) and name == answer_field:
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        values[name] = value
    return Example(
        prompt=values[problem_field],
        answer=values[answer_field],
        solution=values.get(solution_field) if solution_field else None,
        meta={"source": where, **({"teacher": values[teacher_field]} if teacher_field else {})},
    )


@functools.lru_cache(maxsize=65536)
def parse_gold(answer: str):
    """The reference answer as math-verify reads it (empty when it cannot), parsed once per distinct answer."""
    from math_verify import parse

    return parse(f"${answer}$") or parse(answer)


def answer_is_correct(completion: str, answer: str) -> bool:
    """math-verify equivalence of the completion's final answer with the reference answer."""
    from math_verify import parse, verify

    gold = parse_gold(answer)
    predicted = parse(completion)
    return bool(gold and predicted and verify(gold, predicted))


@dataclass
class MathConfig(TaskConfig):
    """``task.name: math``: problems from a JSONL file or a ``datasets.save_to_disk`` directory."""

    name: str = "math"
    path: str | None = None
    eval_path: str | None = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = "solution"
    teacher_field: str | None = None  # column naming each row's teacher route (teacher.routes)

    def validate(self, cfg: Any) -> None:
        require(self.path is not None, "task.path", "is required for task.name=math (a JSONL file or a saved dataset)")
        if cfg.teacher.routes:
            require(self.teacher_field is not None, "task.teacher_field", "must name the column that routes each row to a teacher")

    def missing_solutions_key(self) -> str | None:
        return "task.solution_field" if self.solution_field is None else None


@register_task("math", MathConfig)
@dataclass
class MathTask:
    """Problems from ``path`` (JSONL, or a directory saved by ``datasets.save_to_disk``).

    The held-out split is ``eval_path`` when given, else the last ``eval_size`` rows of a
    seeded shuffle of ``path``.
    """

    path: str
    eval_path: str | None = None
    eval_size: int = 64
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = "solution"
    teacher_field: str | None = None
    seed: int = 0
    name: str = "math"

    @classmethod
    def from_config(cls, c: MathConfig, seed: int = 0) -> "MathTask":
        return cls(
            path=c.path, eval_path=c.eval_path, eval_size=c.eval_size, problem_field=c.problem_field,
            answer_field=c.answer_field, solution_field=c.solution_field, teacher_field=c.teacher_field, seed=seed,
        )

    def __post_init__(self) -> None:
        self._unreadable: set[str] = set()
        rows = self._load(self.path)
        if self.eval_path:
            self._train, self._eval = rows, self._load(self.eval_path)
        else:
            random.Random(self.seed).shuffle(rows)
            if len(rows) < 2:
                raise DataError(f"{self.path}: need at least 2 rows to hold some out for evaluation")
            n_eval = min(self.eval_size, len(rows) // 2)
            self._train, self._eval = rows[:-n_eval], rows[-n_eval:]

    def _load(self, path: str) -> list[Example]:
        if Path(path).is_dir():
            return self._load_dataset(path)
        return read_jsonl(path, self.problem_field, self.answer_field, self.solution_field, self.teacher_field)

    def _load_dataset(self, path: str) -> list[Example]:
        import datasets

        try:
            data = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path}: a directory that is not a dataset saved by datasets.save_to_disk ({err})") from None
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (it has: {', '.join(data)})")
            data = data["train"]
        return [
            _row_to_example(row, f"{path}[{i}]", self.problem_field, self.answer_field, self.solution_field, self.teacher_field)
            for i, row in enumerate(data)
        ]

    def sample_train(self, n: int, rng: random.Random) -> list[Example]:
        return [self._train[rng.randrange(len(self._train))] for _ in range(n)]

    def eval_examples(self) -> list[Example]:
        return list(self._eval)

    def reward(self, completion: str, example: Example) -> float:
        if not parse_gold(example.answer) and example.answer not in self._unreadable:
            self._unreadable.add(example.answer)  # said once per answer: every completion of it scores 0
            log.warning(
                "%s: math-verify cannot read the answer %r, so every completion of this row scores 0 "
                "(%d such answers so far)", example.meta.get("source", "a row"), example.answer[:60], len(self._unreadable),
            )
        return float(answer_is_correct(completion, example.answer))

    def messages(self, example: Example) -> list[dict]:
        return [{"role": "user", "content": f"{example.prompt}\n\n{STUDENT_INSTRUCTION}"}]

    def privileged_messages(self, example: Example) -> list[dict]:
        if example.solution is None:
            raise DataError(f"{example.meta.get('source', 'a row')}: no reference solution for a privileged teacher")
        instruction = TEACHER_INSTRUCTION.format(solution=example.solution)
        return [{"role": "user", "content": f"{example.prompt}\n\n{instruction}"}]

    def step_judge(self) -> None:
        return None
