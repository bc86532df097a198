"""Stopping a run so that it can be resumed: on SIGTERM, SIGUSR1 or SIGINT (a scheduler's preemption notice, a
requeue signal, Ctrl-C), and a safe margin before ``run.time_limit`` (docs/cluster.md).

A signal only raises a flag; the loop reads it between steps (``StopRequests.reason``), where every rank agrees
(the most urgent rank's reason wins, one integer all-reduce per step) so they stop at the same step. Rank 0 then
writes a checkpoint of that step (unless one exists) and ``Preempted`` ends the run with ``PREEMPTED_EXIT``. A
second Ctrl-C (more than ``SECOND_INTERRUPT_S`` after the first: a launcher forwarding the terminal's own SIGINT
does not count) stops at once, as Ctrl-C always did.

The time limit is wall-clock time since the run started. Before each step the run stops when the next step could
not finish before the limit with a margin: the longest step so far (evaluation and checkpoint included) plus
the longest checkpoint write, each taken 1.25 times.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" — the run stopped early and resumes with --resume
STOPPED_FILE = "stopped.json"  # written into the run directory by rank 0 when it stops so; removed when it resumes
SECOND_INTERRUPT_S = 2.0
SAFETY = 1.25
SIGNALS = {signal.SIGINT: 1, signal.SIGUSR1: 2, signal.SIGTERM: 3}  # more urgent: larger
TIME_LIMIT = 4
REASONS = {0: None, 1: "SIGINT (Ctrl-C)", 2: "SIGUSR1", 3: "SIGTERM", TIME_LIMIT: "run.time_limit"}


class StepAbandoned(Exception):
    """A service failed during a step (``failure``, raised on every rank together): the step is given up, and the
    run stops at its boundary. ``weights_changed``: an update of the step was applied before the failure (with
    ``train.updates_per_batch`` > 1), so the weights are no longer the step boundary's."""

    def __init__(self, failure: Exception, weights_changed: bool = False):
        super().__init__(str(failure))
        self.failure, self.weights_changed = failure, weights_changed


class Preempted(Exception):
    """The run stopped early and resumably: a signal or the time limit; ``checkpoint`` holds the step it stopped at."""

    def __init__(self, reason: str, step: int, checkpoint):
        self.reason, self.step, self.checkpoint = reason, step, checkpoint
        if checkpoint is None:  # (an engine between syncs before the first checkpoint: nothing could hold the steps)
            super().__init__(f"stopped by {reason}, before any checkpoint could hold the run: start it again (exit status {PREEMPTED_EXIT})")
        else:
            super().__init__(
                f"stopped by {reason} after {step} steps; checkpoint {checkpoint} holds them: continue with --resume "
                f"(exit status {PREEMPTED_EXIT})"
            )


@dataclass
class StopRequests:
    """The signals this rank received and the run's time limit; ``reason`` is what every rank agrees on."""

    time_limit_s: float | None = None
    started: float = field(default_factory=time.time)
    received: int = 0  # the most urgent signal's code (SIGNALS), 0 = none
    first_interrupt: float | None = None
    longest_step_s: float = 0.0
    longest_checkpoint_s: float = 0.0
    _previous: dict = field(default_factory=dict)

    def install(self) -> StopRequests:
        """Handle the three signals in this process until ``restore`` (only from the main thread, where Python runs
        signal handlers; elsewhere signals keep their old meaning)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_interrupt is not None and now - self.first_interrupt > SECOND_INTERRUPT_S:
                raise KeyboardInterrupt
            if self.first_interrupt is None:
                self.first_interrupt = now
        if not self.received:
            log.warning("%s received: stopping after the current step, with a checkpoint%s", signal.Signals(signum).name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.received = max(self.received, SIGNALS[signum])

    def out_of_time(self) -> bool:
        if self.time_limit_s is None:
            return False
        needed = SAFETY * (self.longest_step_s + self.longest_checkpoint_s)
        return time.time() - self.started + needed >= self.time_limit_s

    def reason(self, ranks) -> str | None:
        """Why the run stops before its next step (the same on every rank), or None to go on."""
        local = max(self.received, TIME_LIMIT if self.out_of_time() else 0)
        return REASONS[ranks.max(local)]
