"""The embedded reasoning task: multi-digit addition with a step-by-step scratchpad.

A problem ``347+589`` has the reference solution ``7+9=16,4+8+1=13,3+5+1=9|936``: one step
per column from the right, adding the carry, then ``|`` and the answer. The verifier is
exact match on the text after the last ``|``; ``step_accuracy`` checks every step, which
lets a programmatic judge grade a trajectory step by step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from ..config.sections import require
from ..worlds.arithmetic import PRIVILEGED_INSTRUCTION
from .base import Example, RewardsOneByOne, TaskConfig, register_task

ANSWER_SEPARATOR = "|"


def scratchpad(a: int, b: int) -> str:
    """The reference solution for ``a+b``: column steps right to left, then ``|sum``."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(digits_a), len(digits_b))):
        x = int(digits_a[i]) if i < len(digits_a) else 0
        y = int(digits_b[i]) if i < len(digits_b) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
        carry = total // 10
    return ",".join(steps) + ANSWER_SEPARATOR + str(a + b)


def final_answer(completion: str) -> str | None:
    """The text after the last answer separator, or None when there is none."""
    if ANSWER_SEPARATOR not in completion:
        return None
    return completion.rsplit(ANSWER_SEPARATOR, 1)[1].strip()


def step_accuracy(completion: str, a: int, b: int) -> float:
    """Fraction of the reference's column steps (and the final answer) the completion gets right."""
    reference = scratchpad(a, b)
    ref_steps, ref_answer = reference.rsplit(ANSWER_SEPARATOR, 1)
    ref_steps = ref_steps.split(",")
    body, _, answer = completion.partition(ANSWER_SEPARATOR)
    got_steps = body.split(",")
    correct = sum(1 for i, step in enumerate(ref_steps) if i < len(got_steps) and got_steps[i] == step)
    correct += int(answer.strip() == ref_answer and len(got_steps) == len(ref_steps))
    return correct / (len(ref_steps) + 1)


@dataclass
class ArithmeticConfig(TaskConfig):
    """``task.name: arithmetic``: addition of numbers with ``min_digits``..``max_digits`` digits."""

    name: str = "arithmetic"
    min_digits: int = 3
    max_digits: int = 3
    eval_seed: int = 12345
    # said after the reference solution in the privileged prompt, so that the teacher writes its own steps
    # rather than reading the solution back (the embedded world's student_privileged was trained with this one)
    privileged_instruction: str = PRIVILEGED_INSTRUCTION

    has_step_judge: ClassVar[bool] = True

    def validate(self, cfg: Any) -> None:
        require(1 <= self.min_digits <= self.max_digits, "task.min_digits", "must be >= 1 and <= task.max_digits")


@register_task("arithmetic", ArithmeticConfig)
@dataclass
class ArithmeticTask(RewardsOneByOne):
    """Addition of numbers with ``min_digits``..``max_digits`` digits.

    The held-out split is ``eval_size`` problems drawn with ``eval_seed``; training draws
    reject those pairs, so held-out accuracy measures generalisation, not recall.
    """

    min_digits: int = 3
    max_digits: int = 3
    eval_size: int = 256
    eval_seed: int = 12345
    privileged_instruction: str = PRIVILEGED_INSTRUCTION
    name: str = "arithmetic"

    @classmethod
    def from_config(cls, c: ArithmeticConfig, seed: int = 0) -> "ArithmeticTask":
        return cls(
            min_digits=c.min_digits, max_digits=c.max_digits, eval_size=c.eval_size, eval_seed=c.eval_seed,
            privileged_instruction=c.privileged_instruction,
        )

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"task.min_digits ({self.min_digits}) must be >= 1 and <= task.max_digits ({self.max_digits})"
            )
        self._eval = self._draw(self.eval_size, random.Random(self.eval_seed), exclude=frozenset())
        self._eval_pairs = frozenset((e.meta["a"], e.meta["b"]) for e in self._eval)

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def _draw(self, n: int, rng: random.Random, exclude: frozenset) -> list[Example]:
        examples = []
        while len(examples) < n:
            a, b = self._number(rng), self._number(rng)
            if (a, b) in exclude:
                continue
            examples.append(make_example(a, b))
        return examples

    def sample_train(self, n: int, rng: random.Random) -> list[Example]:
        return self._draw(n, rng, exclude=self._eval_pairs)

    def eval_examples(self) -> list[Example]:
        return list(self._eval)

    def describe_eval(self) -> dict:
        return {"source": f"arithmetic: {self.eval_size} problems drawn with eval_seed {self.eval_seed}", "rows": len(self._eval)}

    def splits(self) -> dict[str, list[Example]]:
        return {"eval": list(self._eval)}  # training problems are drawn afresh each step

    def filter_split(self, name: str, keep) -> None:
        if name != "eval":
            raise ValueError(f"the arithmetic task has no fixed '{name}' split")
        self._eval = [e for e in map(keep, self._eval) if e is not None]

    def reward(self, completion: str, example: Example) -> float:
        return float(final_answer(completion) == example.answer)

    def messages(self, example: Example) -> list[dict]:
        return [{"role": "user", "content": example.prompt}]

    def privileged_messages(self, example: Example) -> list[dict]:
        # The reference solution rides in a system turn ahead of the problem, followed by the instruction.
        context = f"{example.solution}\n{self.privileged_instruction}" if self.privileged_instruction else example.solution
        return [
            {"role": "system", "content": context},
            {"role": "user", "content": example.prompt},
        ]

    def step_judge(self) -> "StepCheckingJudge":
        return StepCheckingJudge()

    def eval_metrics(self, example: Example, completion: str, reward: float) -> dict[str, float]:
        return {}


class StepCheckingJudge:
    """A programmatic verbal judge: checks the scratchpad step by step against the reference solution.

    ``step_scores`` is 9 or 0 per column step, plus one for the final answer; the trajectory's
    score is ``9 × fraction of correct steps``.
    """

    def step_scores(self, example: Example, completion: str) -> list[float]:
        reference = scratchpad(example.meta["a"], example.meta["b"])
        ref_steps = reference.split(ANSWER_SEPARATOR)[0].split(",")
        body, sep, answer = completion.partition(ANSWER_SEPARATOR)
        got = body.split(",")
        scores = [9.0 if i < len(got) and got[i] == step else 0.0 for i, step in enumerate(ref_steps)]
        final_ok = bool(sep) and answer.strip() == example.answer and len(got) == len(ref_steps)
        return scores + [9.0 if final_ok else 0.0]

    def step_starts(self, example: Example, completion: str) -> list[int]:
        """Character offset of each scored step: the column steps as written, then the answer at the ``|``.

        A column step the completion lacks (it stopped early) and the answer both begin where the
        written steps end, so cutting at any rejected step never keeps a wrong answer.
        """
        n_steps = len(scratchpad(example.meta["a"], example.meta["b"]).split(ANSWER_SEPARATOR)[0].split(","))
        body = completion.partition(ANSWER_SEPARATOR)[0]
        starts, offset = [], 0
        for piece in body.split(",")[:n_steps]:
            starts.append(offset)
            offset += len(piece) + 1
        return starts + [len(body)] * (n_steps + 1 - len(starts))

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> list[float]:
        return [sum(s) / len(s) for s in (self.step_scores(e, c) for e, c in zip(examples, completions))]


def make_example(a: int, b: int) -> Example:
    return Example(prompt=f"{a}+{b}", answer=str(a + b), solution=scratchpad(a, b), meta={"a": a, "b": b})
