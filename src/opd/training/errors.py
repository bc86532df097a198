"""The error that stops a training run that cannot go on (too many non-finite steps in a row, a student with nothing
to train, a context with no room for a prompt): one line, printed by the command line. Which errors are the
user's (one line, no traceback), and how a rank whose failure stops the others reports it before they go."""

from __future__ import annotations

import sys
import traceback


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that are a user's mistake or a service's answer: printed as one line, never as a traceback."""
    from ..config.sections import ConfigError
    from ..models.loading import ModelLoadError
    from ..models.pairing import PairingError
    from ..models.prompts import PromptError
    from ..services.http import ServiceError
    from ..tasks.rows import DataError
    from ..teachers.judges import JudgeError
    from .checkpoints import CheckpointError
    from .resume import RunDirError
    from .run_lock import RunDirBusy

    return (ConfigError, ModelLoadError, PairingError, DataError, PromptError, RunDirError, RunDirBusy, TrainingError, JudgeError,
            ServiceError, CheckpointError)


def report_failure(err: Exception, rank: int) -> None:
    """Print ``err`` now, as the command line would (one line for a user error, else its traceback), naming ``rank``:
    a rank whose failure is about to stop the others speaks before they are gone. Marks it ``reported``."""
    where = "" if rank == 0 else f" (rank {rank})"
    if isinstance(err, user_errors()):
        print(f"opd: error{where}: {err}", file=sys.stderr, flush=True)
    else:
        print(f"opd: rank {rank} failed:", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
        sys.stderr.flush()
    err.reported = True
