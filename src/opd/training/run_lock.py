"""An exclusive lock on a run directory, held for the whole run, so two runs never write into one directory.

``<run.output_dir>/.opd-lock`` is locked with ``flock`` (the kernel releases it when the holding
process exits, however it exits, so a crashed run leaves no stale lock) and holds the holder's
pid for the error message a second run gets.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

LOCK_NAME = ".opd-lock"


class RunDirBusy(ValueError):
    """Another opd run holds the run directory."""


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> "RunDirLock":
        directory = self.path.parent
        blocker = next((p for p in [directory, *directory.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            where = "is a file" if blocker == directory else f"is under a file ({blocker})"
            raise RunDirBusy(f"run.output_dir '{directory}' {where}; choose a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as err:
            raise RunDirBusy(f"run.output_dir '{directory}' cannot be written ({err.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunDirBusy(
                    f"run.output_dir '{self.path.parent}' is in use by another opd run (pid {holder}); "
                    "wait for it to finish or choose another run.output_dir"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            if fcntl is not None:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
