"""``opd train`` in a child process that meets a real resource limit part-way through a run: a cap on its address space
(``RLIMIT_AS``: allocations fail, as on a machine out of memory), on the size of any file it writes (``RLIMIT_FSIZE``:
writes fail with EFBIG, as on a full disk), or a filesystem filled up to its last ``KEEP`` bytes (ENOSPC).

    python tests/limited.py WHEN LIMIT AMOUNT CONFIG [overrides...]

WHEN: ``step:N`` (before the loop's step N, 0-based) or ``final`` (before the final model is written); LIMIT: ``as``
(AMOUNT MiB above what the process has mapped then), ``fsize`` (AMOUNT KiB per file) or ``fill:DIR`` (a file in DIR
takes all of its filesystem's free space but AMOUNT KiB). The limit itself is the operating system's; only the moment
it starts is chosen here."""

from __future__ import annotations

import os
import resource
import signal
import sys


def mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def apply(limit: str, amount: int) -> None:
    if limit == "as":
        resource.setrlimit(resource.RLIMIT_AS, (mapped_bytes() + amount * 2**20, resource.RLIM_INFINITY))
    elif limit == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (amount * 1024, resource.RLIM_INFINITY))
    elif limit.startswith("fill:"):
        directory = limit.split(":", 1)[1]
        stats = os.statvfs(directory)
        with open(os.path.join(directory, "filler"), "wb") as filler:
            filler.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - amount * 1024))
    else:
        raise SystemExit(f"unknown limit {limit}")


def main() -> int:
    when, limit, amount, *argv = sys.argv[1:]
    import opd.training.loop as loop

    if when.startswith("step:"):
        at, real_step = int(when.split(":")[1]), loop.train_step

        def train_step(s, optimizer, step):
            if step == at:
                apply(limit, int(amount))
            return real_step(s, optimizer, step)

        loop.train_step = train_step
    elif when == "final":
        real_save = loop.save_final_model

        def save_final_model(*args, **kwargs):
            apply(limit, int(amount))
            return real_save(*args, **kwargs)

        loop.save_final_model = save_final_model
    from opd.cli import main as opd_main

    return opd_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
