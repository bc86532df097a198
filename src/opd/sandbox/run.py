"""``Sandbox``: run a program (a directory of files whose ``main.py`` starts it) isolated and limited, and say how it
ended (``Outcome``). Programs run in parallel, ``workers`` at a time; each gets a fresh directory, removed afterwards.

How a run ends, as ``Outcome.status``: ``ok`` (exit status 0), ``error`` (another exit status), ``memory`` (it failed
to allocate under its memory limit), ``timeout`` (still running at the wall-clock deadline: its whole process group,
and with ``namespaces`` its whole PID namespace, is killed), ``cpu_time`` (its CPU-time limit), ``disk`` (it wrote
past its file-size limit), ``output_limit`` (more than ``Limits.output_kb`` of stdout and stderr: stopped),
``killed`` (ended by another signal) or ``sandbox_error`` (the sandbox itself could not start: the program never ran).
"""

from __future__ import annotations

import os
import queue
import selectors
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .isolation import Limits, WorkerUsers, check_isolation, fresh_dir, interpreter, limits_only_command, namespaces_command, scrubbed_env

STATUSES = ("ok", "error", "memory", "timeout", "cpu_time", "disk", "output_limit", "killed", "sandbox_error")
SIGNAL_STATUS = {signal.SIGXCPU: "cpu_time", signal.SIGXFSZ: "disk"}


@dataclass(frozen=True)
class Outcome:
    status: str  # one of STATUSES
    stdout: str
    stderr: str
    exit_code: int | None
    seconds: float


@dataclass(frozen=True)
class Job:
    """One program run: its files (name -> text; ``main.py`` is what runs) and what its stdin holds."""

    files: dict[str, str]
    stdin: str = ""


class Sandbox:
    """Runs ``Job``s under ``isolation`` (``namespaces`` or ``limits_only``: ``sandbox.isolation``) and ``limits``,
    ``workers`` at a time, with ``python`` (None: the base interpreter of the one running opd), its installed packages
    importable only with ``site``. Checks at once that this machine can isolate as asked (``SandboxUnavailable``
    otherwise)."""

    def __init__(
        self, isolation: str = "namespaces", limits: Limits = Limits(), workers: int = 2, python: str | None = None, site: bool = False,
    ):
        self.isolation, self.limits, self.workers = isolation, limits, workers
        self.python, self.site = interpreter(python), site
        self.users = WorkerUsers(workers)
        check_isolation(isolation, self.python, limits, self.users[0], site)
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(workers):
            self._slots.put(slot)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opd-sandbox")

    def run_all(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Every job's outcome, in order; ``workers`` run at once."""
        return list(self._pool.map(self.run, jobs))

    def run(self, job: Job) -> Outcome:
        slot = self._slots.get()
        try:
            outcome = self._run(job, self.users[slot])
            if outcome.status == "sandbox_error":  # e.g. the machine briefly out of processes or memory: once more
                outcome = self._run(job, self.users[slot])
            return outcome
        finally:
            self._slots.put(slot)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.users.release()

    def _run(self, job: Job, uid: int | None) -> Outcome:
        started = time.monotonic()
        try:
            directory = fresh_dir(uid)
        except OSError as err:  # a full disk, a TMPDIR the worker's user cannot own: the program never ran
            return Outcome("sandbox_error", "", f"cannot make its directory: {err}", None, time.monotonic() - started)
        info_read, info_write = os.pipe() if self.isolation == "namespaces" else (None, None)
        try:
            for name, text in job.files.items():
                path = Path(directory) / name
                path.write_text(text, encoding="utf-8", errors="surrogateescape")
                path.chmod(0o644)
            build = namespaces_command if self.isolation == "namespaces" else limits_only_command
            command = build(self.python, directory, self.limits, uid, self.site, info_write)
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=directory,
                env=scrubbed_env(directory), start_new_session=True, pass_fds=(info_write,) if info_write is not None else (),
            )
        except (OSError, UnicodeError, ValueError) as err:
            shutil.rmtree(directory, ignore_errors=True)
            return Outcome("sandbox_error", "", str(err), None, time.monotonic() - started)
        finally:
            if info_write is not None:
                os.close(info_write)
        try:
            try:
                out, err, cut = pump(process, job.stdin.encode("utf-8", "surrogateescape"), self.limits.output_kb << 10,
                                     started + self.limits.wall_s)
            finally:
                end_group(process)
            set_up = info_read is None or bool(read_available(info_read))  # bubblewrap said the sandbox stood
            status = cut or (status_of(process.returncode, err, self.isolation) if set_up else "sandbox_error")
            return Outcome(status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), process.returncode,
                           time.monotonic() - started)
        finally:
            if info_read is not None:
                os.close(info_read)
            shutil.rmtree(directory, ignore_errors=True)


def read_available(fd: int) -> bytes:
    """What a pipe holds now (its writer closed), without waiting."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def pump(process: subprocess.Popen, stdin: bytes, cap: int, deadline: float) -> tuple[bytes, bytes, str | None]:
    """Feed ``stdin`` and read stdout and stderr, all from one loop (non-blocking, as ``Popen.communicate`` does: a
    program that never reads its input cannot block the trainer), until both close and the process exits;
    ``(out, err, cut)`` where ``cut`` is ``output_limit`` or ``timeout`` when the run had to be stopped."""
    buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        if pending:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), "timeout"
            for key, _ in selector.select(remaining):
                if key.fileobj is process.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]) :]
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, OSError):  # the program stopped reading: the rest is not for it
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(process.stdin)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffers[key.fileobj] += chunk
                if sum(len(b) for b in buffers.values()) > cap:
                    return bytes(buffers[process.stdout])[:cap], bytes(buffers[process.stderr])[:cap], "output_limit"
    while not exited(process.pid):  # (not reaped yet: ``end_group`` still kills its group under its id)
        if time.monotonic() >= deadline:
            return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), "timeout"
        time.sleep(0.002)
    return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), None


def end_group(process: subprocess.Popen) -> None:
    """Kill whatever is left of the run, then reap it. Bubblewrap's child — the init of the program's PID namespace,
    whose death ends every process in it — goes first, so that bubblewrap itself reaps it and exits (killed first, it
    would leave that child to the machine's init, which in a container may never reap it); then the run's process
    group, while its leader is not yet reaped (so its id cannot have passed to another process)."""
    if process.returncode is None:  # (never reaped before this: its id and its group's are still its own)
        if not exited(process.pid):
            for child in children(process.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + 1.0
            while not exited(process.pid) and time.monotonic() < deadline:
                time.sleep(0.005)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()
    for stream in (process.stdout, process.stderr, process.stdin):
        if stream is not None and not stream.closed:
            stream.close()


def exited(pid: int) -> bool:
    """Whether ``pid`` (a child) has ended, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        found = []
        for entry in os.scandir("/proc"):
            try:
                if entry.name.isdigit() and int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return found


def status_of(code: int, stderr: bytes, isolation: str) -> str:
    """How a program that ran to its end ended, from its exit status (bubblewrap reports a signal as 128 + its
    number) and its stderr."""
    signum = -code if code < 0 else code - 128 if isolation == "namespaces" and code > 128 else None
    if signum is not None and signum in SIGNAL_STATUS:
        return SIGNAL_STATUS[signum]
    if signum == signal.SIGKILL:
        return "killed"
    if code == 0:
        return "ok"
    if b"MemoryError" in stderr or b"Cannot allocate memory" in stderr:
        return "memory"
    if isolation == "limits_only" and code in (126, 127) and stderr.startswith((b"prlimit:", b"setpriv:")):
        return "sandbox_error"  # (under namespaces, bubblewrap's info descriptor tells a sandbox that never stood)
    if b"File too large" in stderr:
        return "disk"
    return "error" if signum is None else "killed"
