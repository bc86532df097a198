"""The pre-flight pass: every fixed row of the task checked against the method and the context, before any model
is loaded, so that no run stops mid-way on a data row.

Per split (training and evaluation alike):

- required fields: a method trained on rewards needs an answer on every training row, one trained on (or
  conditioned on) reference solutions a solution; the first row without one is named and the run refused;
- empty prompts are dropped (counted);
- prompts (and the privileged prompt, and a reference solution behind its prompt, where the method uses them)
  longer than the context leaves are handled by ``task.too_long``: ``skip`` (counted), ``truncate`` (the last
  user turn loses its beginning until the prompt fits; a privileged prompt or solution that still does not fit
  is skipped), or ``error`` (the first such row named).

The counts go to the log and to ``summary.json`` (``data_checks``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from ..models.prompts import encode_completion, prompt_ids
from ..tasks.base import Example, Task
from ..tasks.rows import DataError
from ..tasks.reward_functions import example_where, grades_every_row

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """The token room a split's rows must fit: the prompt's (context − new tokens) and the whole sequence's."""

    prompt: int | None  # None: the model states no context length, so lengths are not checked
    total: int | None


def check_task_data(task: Task, tokenizer, needs, cfg, context: int | None, splits=("train", "eval")) -> dict:
    """Run the pre-flight pass over ``task``'s fixed splits (dropping or truncating rows in place); return the report."""
    started = time.time()
    eval_new = cfg.eval.max_new_tokens if cfg.eval.max_new_tokens is not None else cfg.sampling.max_new_tokens
    new_tokens = {"train": ("sampling.max_new_tokens", cfg.sampling.max_new_tokens), "eval": ("eval.max_new_tokens", eval_new)}
    report = {}
    for name, examples in task.splits().items():
        if name not in splits:
            continue
        if name == "train":
            _require_fields(examples, needs, answers_optional=grades_every_row(task))
        key, new = new_tokens[name]
        if context and context - new < 1:
            raise DataError(f"{key}={new} leaves no room for a prompt in the student's {context}-token context")
        budget = Budget(context - new, context) if context else Budget(None, None)
        measure = name == "train" and cfg.train.micro_batch_tokens is not None
        checker = _RowChecker(task, tokenizer, cfg.task.chat_template_kwargs, budget, cfg.task.too_long, needs if name == "train" else None, measure)
        task.filter_split(name, checker)
        if measure and checker.longest[0] > cfg.train.micro_batch_tokens:
            n, source = checker.longest
            raise DataError(
                f"train.micro_batch_tokens={cfg.train.micro_batch_tokens} is smaller than the longest training prompt "
                f"({n} tokens, {source}), so every row would train alone; give it at least the longest prompt plus "
                f"sampling.max_new_tokens ({n + cfg.sampling.max_new_tokens})"
            )
        counts = {"rows": len(examples), "kept": len(examples) - checker.skipped_long - checker.empty, **checker.counts()}
        taken = sum(bool(e.meta.get("answer_from_solution")) for e in examples)
        if taken:
            counts["answers_from_solutions"] = taken  # rows graded against their solution's final \boxed{}
        report[name] = counts
        if counts["kept"] == 0:
            raise DataError(f"the {name} data has no usable row left: {_describe(counts)} (task.too_long={cfg.task.too_long})")
        if checker.skipped_long or checker.empty or checker.truncated:
            log.warning("%s data: %s", name, _describe(counts, budget))
    if "eval" in report and not grades_every_row(task) and not any(e.answer is not None for e in task.eval_examples()):
        log.warning("the evaluation data has no answers: evaluation reports completion lengths only, no accuracy")
    report["seconds"] = round(time.time() - started, 2)
    return report


def _describe(counts: dict, budget: Budget | None = None) -> str:
    parts = [f"{counts['kept']} of {counts['rows']} rows kept"]
    if counts["skipped_too_long"]:
        parts.append(f"{counts['skipped_too_long']} too long for the context skipped")
    if counts["truncated"]:
        parts.append(f"{counts['truncated']} truncated to fit")
    if counts["empty"]:
        parts.append(f"{counts['empty']} with an empty prompt dropped")
    room = f" (the context leaves {budget.prompt} prompt tokens)" if budget and budget.prompt is not None else ""
    return "; ".join(parts) + (room if counts["skipped_too_long"] or counts["truncated"] else "")


def _require_fields(examples: list[Example], needs, answers_optional: bool = False) -> None:
    wanted = []
    if needs.answers and not answers_optional:  # a user's reward function grades rows with or without one
        wanted.append(("answer", "trains on the task's rewards, which grade against an answer (task.answer_field)"))
    if needs.solutions or needs.privileged:
        wanted.append(("solution", "uses reference solutions (a final assistant turn, a completion, or task.solution_field)"))
    for attr, why in wanted:
        missing = [e for e in examples if getattr(e, attr) is None]
        if missing:
            raise DataError(
                f"{missing[0].meta.get('source', 'a row')}: no {attr}, and the method {why}; "
                f"{len(missing)} of {len(examples)} training rows lack one"
            )


class _RowChecker:
    """Maps each example to itself, a truncated copy, or None (dropped), counting what it did."""

    def __init__(self, task: Task, tokenizer, template_kwargs: dict, budget: Budget, policy: str, needs, measure: bool = False):
        self.task, self.tokenizer, self.kwargs, self.budget, self.policy = task, tokenizer, template_kwargs, budget, policy
        self.measure = measure  # keep the longest kept prompt (train.micro_batch_tokens must hold it)
        self.longest: tuple[int, str] = (0, "")
        self.privileged = needs is not None and needs.privileged
        self.solutions = needs is not None and needs.solutions
        self.skipped_long = self.truncated = self.empty = 0

    def counts(self) -> dict:
        return {"skipped_too_long": self.skipped_long, "truncated": self.truncated, "empty": self.empty}

    def _prompt_tokens(self, messages: list[dict]) -> int:
        return len(prompt_ids(self.tokenizer, messages, self.kwargs))

    def __call__(self, example: Example) -> Example | None:
        if not any(m["content"].strip() for m in example.turns() if m["role"] == "user"):  # the row's own words, not the instruction
            self.empty += 1
            return None
        if self.budget.prompt is None:
            return self._measured(example, self._prompt_tokens(self.task.messages(example))) if self.measure else example
        n = self._prompt_tokens(self.task.messages(example))
        if n > self.budget.prompt:
            if self.policy == "error":
                raise DataError(
                    f"{example.meta.get('source', 'a row')}: prompt of {n} tokens is longer than the {self.budget.prompt} "
                    "the context leaves for it (task.too_long=skip or truncate handles such rows)"
                )
            shorter = self._truncate(example) if self.policy == "truncate" else None
            if shorter is None:
                self.skipped_long += 1
                return None
            self.truncated += 1
            example = shorter
            n = self._prompt_tokens(self.task.messages(example))
        if not self._extras_fit(example, n):
            if self.policy == "error":
                raise DataError(
                    f"{example.meta.get('source', 'a row')}: its privileged prompt or reference solution does not fit "
                    f"the {self.budget.total}-token context (task.too_long=skip drops such rows)"
                )
            self.skipped_long += 1
            return None
        return self._measured(example, n)

    def _measured(self, example: Example, prompt_tokens: int) -> Example:
        if self.measure and prompt_tokens > self.longest[0]:
            self.longest = (prompt_tokens, example_where(example))
        return example

    def _extras_fit(self, example: Example, prompt_tokens: int) -> bool:
        if self.privileged and example.solution is not None:
            if self._prompt_tokens(self.task.privileged_messages(example)) > self.budget.prompt:
                return False
        if self.solutions and example.solution is not None:
            solution = encode_completion(self.tokenizer, self.task.messages(example), example.solution, self.kwargs)
            total = prompt_tokens + len(solution)
            if total > self.budget.total:
                return False
        return True

    def _truncate(self, example: Example) -> Example | None:
        """The example with the start of its last user turn cut until the student's prompt fits; None if it cannot."""
        turns = example.turns()
        last = max(i for i, m in enumerate(turns) if m["role"] == "user")
        text = turns[last]["content"]

        def cut(keep: int) -> Example:
            kept = text[len(text) - keep :] if keep else ""
            new_turns = turns[:last] + [{**turns[last], "content": kept}] + turns[last + 1 :]
            return replace(example, prompt=kept, messages=tuple(new_turns), meta={**example.meta, "truncated": True})

        low, high = 0, len(text)  # the most characters kept that still fit, by bisection
        if self._prompt_tokens(self.task.messages(cut(0))) > self.budget.prompt:
            return None  # the rest of the prompt alone is too long
        while low < high:
            mid = (low + high + 1) // 2
            if self._prompt_tokens(self.task.messages(cut(mid))) <= self.budget.prompt:
                low = mid
            else:
                high = mid - 1
        return cut(low) if low > 0 else None

