"""Tasks whose splits are fixed lists of examples: training rows, and held-out rows from their own file or a
seeded share of the training file."""

from __future__ import annotations

import random
from typing import Callable

from .base import Example
from .rows import DataError


class FixedSplits:
    """The ``Task`` methods of a task whose splits are fixed lists: ``self._train``, ``self._eval`` and
    ``self._eval_source`` (where the held-out rows come from), set by the task."""

    _train: list[Example]
    _eval: list[Example]
    _eval_source: str

    def sample_train(self, n: int, rng: random.Random) -> list[Example]:
        return [self._train[rng.randrange(len(self._train))] for _ in range(n)]

    def eval_examples(self) -> list[Example]:
        return list(self._eval)

    def describe_eval(self) -> dict:
        return {"source": self._eval_source, "rows": len(self._eval)}

    def splits(self) -> dict[str, list[Example]]:
        return {"train": list(self._train), "eval": list(self._eval)}

    def eval_metrics(self, example: Example, completion: str, reward: float) -> dict[str, float]:
        return {}

    def filter_split(self, name: str, keep: Callable[[Example], Example | None]) -> None:
        kept = [e for e in map(keep, self.splits()[name]) if e is not None]
        if name == "train":
            self._train = kept
        else:
            self._eval = kept

    def load_splits(self, read: Callable[[str], list[Example]], path: str, eval_path: str | None, eval_size: int | None, seed: int) -> None:
        """Training rows ``read(path)``; held-out rows ``read(eval_path)``, or else ``hold_out`` of them."""
        rows = read(path)
        if eval_path:
            self._train, self._eval, self._eval_source = rows, read(eval_path), eval_path
        else:
            self._train, self._eval, self._eval_source = hold_out(rows, path, eval_size, seed)


def hold_out(rows: list[Example], source: str, eval_size: int | None, seed: int) -> tuple[list[Example], list[Example], str]:
    """``(train, eval, where eval comes from)``: ``eval_size`` rows of a seeded shuffle held out (default a tenth)."""
    n_eval = eval_size or max(1, len(rows) // 10)
    if n_eval >= len(rows):
        raise DataError(f"{source}: holding out task.eval_size={n_eval} rows leaves none of its {len(rows)} for training")
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:-n_eval], shuffled[-n_eval:], f"{source}: {n_eval} of its {len(rows)} rows held out (task.eval_size; seed {seed})"
