"""The run's progress on stderr: tqdm's bar in a terminal; elsewhere (a CI log, a cluster job's output file) one
plain line every ``LINE_EVERY_S`` seconds and at the last step, instead of a carriage-return update per step."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from tqdm.auto import tqdm

LINE_EVERY_S = 30.0


class ProgressLines:
    """The bar's interface (iterate, ``set_postfix``, ``close``) as occasional lines."""

    def __init__(self, steps: Iterable[int], start: int, total: int, name: str, every_s: float = LINE_EVERY_S, stream=None):
        self.steps, self.start, self.total, self.name, self.every_s = steps, start, total, name, every_s
        self.stream = stream or sys.stderr
        self.started = self.last = time.time()
        self.done, self.shown = start, {}

    def __iter__(self) -> Iterator[int]:
        for step in self.steps:
            yield step
            self.done = step + 1
            now = time.time()
            if now - self.last >= self.every_s or self.done == self.total:
                self.last = now
                self._line(now)

    def set_postfix(self, shown: dict) -> None:
        self.shown = dict(shown)

    def _line(self, now: float) -> None:
        taken = self.done - self.start
        pace = f", {(now - self.started) / taken:.2f} s/step" if taken else ""
        extra = "".join(f", {k}={v}" for k, v in self.shown.items())
        print(f"{self.name}: step {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%){pace}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress(steps: range, start: int, total: int, name: str, shown: bool):
    """tqdm's bar where stderr is a terminal, ``ProgressLines`` elsewhere; nothing when not ``shown``."""
    if shown and not sys.stderr.isatty():
        return ProgressLines(steps, start, total, name)
    return tqdm(steps, initial=start, total=total, disable=not shown, desc=name, dynamic_ncols=True)
