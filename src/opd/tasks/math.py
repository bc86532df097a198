"""Users' own data (``task.name: math``): conversations, prompts or problems from JSONL, JSON, Parquet or a saved
``datasets`` dataset (see ``rows``), graded by math-verify on the completion's final ``\\boxed{}``.

A row needs only a prompt: the distillation methods train on prompts alone. An ``answer`` is what the grader
and the reward-trained methods (GRPO, OPD + task reward) use; a reference solution (a final assistant turn, a
``completion``, or a ``solution``) is the SFT target and the privileged context of self-distillation. The
pre-flight pass (``preflight``) says at start-up which rows lack what the method needs.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..config.sections import require
from .base import Example, RewardsOneByOne, TaskConfig, register_task
from .rows import DataError, Fields, dataset_splits, final_boxed, read_examples, world_file
from .splits import FixedSplits

log = logging.getLogger(__name__)

STUDENT_INSTRUCTION = "Reason step by step, and put your final answer in \\boxed{}."
TEACHER_INSTRUCTION = (
    "Here is a reference solution:\n{solution}\n\n"
    "Now give your own step-by-step reasoning that reaches the same answer. "
    "Put your final answer in \\boxed{}."
)
# for conversational and prompt rows, which carry no boxed-answer convention
CHAT_TEACHER_INSTRUCTION = "Here is a reference answer:\n{solution}\n\nNow write your own answer in your own words."
DEFAULT_MAX_HELD_OUT = 256  # rows held out of the training data when no evaluation data is given


@functools.lru_cache(maxsize=65536)
def parse_gold(answer: str):
    """The reference answer as math-verify reads it (empty when it cannot), parsed once per distinct answer."""
    from math_verify import parse

    return parse(f"${answer}$") or parse(answer)


def extract_answer(completion: str, pattern: re.Pattern | None = None) -> str | None:
    """The completion's final answer: the last match of ``pattern`` (its first group that matched, if it has groups), else the
    last ``\\boxed{}``. None when there is none: such a completion is not graded correct, whatever it contains."""
    if pattern is None:
        return final_boxed(completion)
    matches = list(pattern.finditer(completion))
    if not matches:
        return None
    last = matches[-1]
    if not pattern.groups:
        return last.group(0)
    return next((g for g in last.groups() if g is not None), None)


def answer_is_correct(completion: str, answer: str, pattern: re.Pattern | None = None) -> bool:
    """math-verify equivalence of the completion's extracted final answer with the reference answer."""
    from math_verify import parse, verify

    extracted = extract_answer(completion, pattern)
    if extracted is None or not extracted.strip():
        return False
    gold = parse_gold(answer)
    predicted = parse(f"${extracted}$") or parse(extracted)
    return bool(gold and predicted and verify(gold, predicted))


@dataclass
class MathConfig(TaskConfig):
    """``task.name: math``: the user's data (``path``; see ``tasks.rows`` for the file types and row shapes)."""

    name: str = "math"
    path: str | None = None
    eval_path: str | None = None  # held-out data; None = a saved DatasetDict's eval split, else rows held out of path
    split: str | None = None  # a saved DatasetDict's training split (None = "train")
    eval_split: str | None = None  # its evaluation split (None = "test", else "validation", when it has one)
    eval_size: int | None = None  # rows held out of path when there is no eval data; None = 10%, at most 256
    format: Literal["auto", "messages", "prompt", "problem"] = "auto"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = "solution"
    teacher_field: str | None = None  # column naming each row's teacher route (teacher.routes)
    system_prompt: str | None = None  # a system turn put ahead of rows that have none
    # appended to the last user turn; None = the boxed-answer instruction for problem rows and nothing for
    # conversational / prompt rows; "" = nothing for any row
    instruction: str | None = None
    # the privileged teacher's addition to the last user turn, with {solution}; None = by row shape
    privileged_instruction: str | None = None
    # a regex whose last match (its first group, if any) is the final answer; None = the last \boxed{}
    answer_pattern: str | None = None
    # a row with no answer field takes the last \boxed{} of its reference solution (a conversation's final
    # assistant turn) as its answer, so that chat data is graded; counted in data_checks
    answer_from_solution: bool = True

    def validate(self, cfg: Any) -> None:
        require(self.path is not None, "task.path", "is required for task.name=math (a JSONL / JSON / Parquet file or a saved dataset)")
        require(self.eval_size is None or self.eval_size >= 1, "task.eval_size", f"must be >= 1 (or null), got {self.eval_size}")
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as err:
                require(False, "task.answer_pattern", f"is not a valid regular expression ({err})")
        if self.privileged_instruction is not None:
            require("{solution}" in self.privileged_instruction, "task.privileged_instruction", "must contain {solution}")
        if cfg.teacher.routes:
            require(self.teacher_field is not None, "task.teacher_field", "must name the column that routes each row to a teacher")

    def missing_solutions_key(self) -> str | None:
        return "task.solution_field" if self.solution_field is None and self.format == "problem" else None

    def fields(self) -> Fields:
        return Fields(
            format=self.format, messages=self.messages_field, prompt=self.prompt_field, completion=self.completion_field,
            problem=self.problem_field, solution=self.solution_field, answer=self.answer_field, teacher=self.teacher_field,
            answer_from_solution=self.answer_from_solution,
        )


def eval_split_of(path: str, configured: str | None, required: bool, train_split: str | None = None) -> str | None:
    """The evaluation split of a saved DatasetDict: the configured one, else "test", else "validation"; None for
    a file (which has no splits) or, unless ``required``, a DatasetDict with neither."""
    splits = dataset_splits(path)
    if splits is None:
        return configured  # a split asked of a plain file is refused when it is read
    if configured is not None and configured == train_split:
        log.warning("%s: task.eval_split and task.split are both '%s': evaluation uses the training rows", path, configured)
    found = configured or next((n for n in ("test", "validation") if n in splits and n != train_split), None)
    if found is None and required:
        raise DataError(f"{path}: the DatasetDict has no 'test' or 'validation' split (it has: {', '.join(splits)}); set task.eval_split")
    return found


@register_task("math", MathConfig)
@dataclass
class MathTask(RewardsOneByOne, FixedSplits):
    """The user's data: training rows from ``path``; held-out rows from ``eval_path``, a DatasetDict's eval split,
    or else ``eval_size`` rows of a seeded shuffle of ``path`` (announced with their number)."""

    path: str
    config: MathConfig | None = None
    seed: int = 0
    name: str = "math"

    @classmethod
    def from_config(cls, c: MathConfig, seed: int = 0) -> "MathTask":
        return cls(path=c.path, config=c, seed=seed)

    def __post_init__(self) -> None:
        c = self.config = self.config or MathConfig(path=self.path)
        self.path = world_file(self.path)  # world:code/train.jsonl: a data file of an embedded world
        if c.eval_path:
            c = self.config = replace(c, eval_path=world_file(c.eval_path))
        self._unreadable: set[str] = set()
        self._pattern = re.compile(c.answer_pattern) if c.answer_pattern else None
        fields = c.fields()
        is_dict = dataset_splits(self.path) is not None
        train_split = (c.split or "train") if is_dict else c.split
        rows = read_examples(self.path, fields, train_split)
        if c.eval_path:
            split = eval_split_of(c.eval_path, c.eval_split, required=True)
            same = Path(c.eval_path).resolve() == Path(self.path).resolve() and split == train_split  # e.g. opd eval --data
            self._train, self._eval = rows, (list(rows) if same else read_examples(c.eval_path, fields, split))
            self._eval_source = f"{c.eval_path}[{split}]" if split else c.eval_path
        elif is_dict and (split := eval_split_of(self.path, c.eval_split, required=False, train_split=c.split or "train")) is not None:
            self._train, self._eval = rows, read_examples(self.path, fields, split)
            self._eval_source = f"{self.path}[{split}]"
        else:
            if c.eval_split is not None:
                raise DataError(f"{self.path}: task.eval_split='{c.eval_split}' needs a saved DatasetDict (or give task.eval_path)")
            self._train, self._eval = self._hold_out(rows)
        taken = sum(bool(e.meta.get("answer_from_solution")) for e in self._train + self._eval)
        if taken:
            log.info(
                "%d rows have no '%s' field: each is graded against the last \\boxed{} of its reference solution "
                "(task.answer_from_solution=false turns this off)", taken, c.answer_field,
            )

    def _hold_out(self, rows: list[Example]) -> tuple[list[Example], list[Example]]:
        c = self.config
        n_eval = c.eval_size if c.eval_size is not None else max(1, min(DEFAULT_MAX_HELD_OUT, len(rows) // 10))
        if n_eval >= len(rows):
            raise DataError(
                f"{self.path}: holding out task.eval_size={n_eval} rows for evaluation leaves none of its {len(rows)} "
                "for training (lower task.eval_size, or give task.eval_path)"
            )
        shuffled = list(rows)
        random.Random(self.seed).shuffle(shuffled)
        self._eval_source = f"{self.path}: {n_eval} of its {len(rows)} rows held out (task.eval_size; seed {self.seed})"
        log.warning(
            "no evaluation data given: holding out %d of the %d rows of %s for evaluation, training on the other %d "
            "(task.eval_size sets how many; task.eval_path gives a separate file)", n_eval, len(rows), self.path, len(rows) - n_eval,
        )
        return shuffled[:-n_eval], shuffled[-n_eval:]

    def reward(self, completion: str, example: Example) -> float:
        if example.answer is None:
            return 0.0  # prompt-only rows: nothing to grade (the pre-flight pass refuses them where rewards train)
        if not parse_gold(example.answer) and example.answer not in self._unreadable:
            self._unreadable.add(example.answer)  # said once per answer: every completion of it scores 0
            log.warning(
                "%s: math-verify cannot read the answer %r, so every completion of this row scores 0 "
                "(%d such answers so far)", example.meta.get("source", "a row"), example.answer[:60], len(self._unreadable),
            )
        return float(answer_is_correct(completion, example.answer, self._pattern))

    def _instruction(self, example: Example) -> str:
        if self.config.instruction is not None:
            return self.config.instruction
        return STUDENT_INSTRUCTION if example.meta.get("shape", "problem") == "problem" else ""

    def _base_messages(self, example: Example, addition: str) -> list[dict]:
        turns = example.turns()
        if addition:
            last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
            turns[last_user]["content"] = f"{turns[last_user]['content']}\n\n{addition}"
        if self.config.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.config.system_prompt})
        return turns

    def messages(self, example: Example) -> list[dict]:
        return self._base_messages(example, self._instruction(example))

    def privileged_messages(self, example: Example) -> list[dict]:
        if example.solution is None:
            raise DataError(f"{example.meta.get('source', 'a row')}: no reference solution for a privileged teacher")
        template = self.config.privileged_instruction
        if template is None:
            template = TEACHER_INSTRUCTION if example.meta.get("shape", "problem") == "problem" else CHAT_TEACHER_INSTRUCTION
        return self._base_messages(example, template.replace("{solution}", example.solution))

    def step_judge(self) -> None:
        return None
