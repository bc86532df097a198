"""Where a training step's time goes: wall-clock seconds per phase (sampling, teacher, student, optimizer, …).

Phases nest: time spent in an inner phase (the teacher scoring inside the loss) is counted
there and not in the enclosing one, so the phases of a step add up to the time they cover.
On CUDA each boundary synchronises the device, so asynchronous kernels are charged to the
phase that launched them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | None = None):
        self._sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
        self._seconds: dict[str, float] = {}
        self._open: list[list] = []  # [name, start, seconds spent in nested phases]
        self.failed_in: str | None = None  # the innermost phase an exception left since the last ``pop``

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        frame = [name, time.perf_counter(), 0.0]
        self._open.append(frame)
        try:
            yield
        except BaseException:
            self.failed_in = self.failed_in or name
            raise
        finally:
            self._sync()
            self._open.pop()
            elapsed = time.perf_counter() - frame[1]
            self._seconds[name] = self._seconds.get(name, 0.0) + elapsed - frame[2]
            if self._open:
                self._open[-1][2] += elapsed

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last ``pop``, then reset."""
        seconds, self._seconds, self.failed_in = self._seconds, {}, None
        return seconds


def phase_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Each phase's fraction of the total."""
    total = sum(seconds.values())
    return {name: value / total for name, value in seconds.items()} if total > 0 else {}


def proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None where there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_resident_peak() -> bool:
    """Reset the process's resident-set high-water mark (``VmHWM``) to its current size by writing 5 to
    ``/proc/self/clear_refs`` (Linux); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """The memory high-water mark of one step, in MiB: on CUDA ``torch.cuda.max_memory_allocated`` since ``reset``;
    on Linux the process's resident-set peak (``VmHWM``, reset each step by ``reset_resident_peak``), which counts
    the loaded models too; None where neither can be read."""

    def __init__(self, device: torch.device | None = None):
        self._cuda = device is not None and device.type == "cuda"
        self._resident = not self._cuda

    def reset(self) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self._resident:
            self._resident = reset_resident_peak()

    def peak_mb(self) -> float | None:
        if self._cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        kib = proc_status_kib("VmHWM") if self._resident else None
        return None if kib is None else kib / 1024
