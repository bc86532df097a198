"""Peak-memory and machine helpers shared by the benchmarks.

CPU peak memory is the process's resident-set high-water mark (``VmHWM``), reset just before
the measured call by writing ``5`` to ``/proc/self/clear_refs`` (Linux). The reported figure is
``peak - resident before the call``: what the call itself added, inputs excluded. On CUDA it
is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
allocated before the call.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import time
from contextlib import contextmanager

import torch

from opd.training.profiling import proc_status_kib, reset_resident_peak


def _status_kib(field: str) -> int:
    kib = proc_status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return kib


@contextmanager
def measure(device: torch.device):
    """Yields a dict that receives ``seconds`` and ``peak_bytes`` (added by the block) on exit."""
    gc.collect()
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        if not reset_resident_peak():
            raise RuntimeError("cannot reset the resident-set peak (/proc/self/clear_refs)")
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        out["peak_bytes"] = _status_kib("VmHWM") * 1024 - before
    out["seconds"] = time.perf_counter() - start


def available_bytes() -> int:
    """Memory a new allocation can still get: free GPU memory, or ``MemAvailable`` on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def machine() -> str:
    """One line naming the machine, torch build and date, for BENCHMARKS.md."""
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{where}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"
