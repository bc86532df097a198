"""How a program is isolated: the command that starts it, and whether this machine can isolate it.

``namespaces`` (the default) runs the program under bubblewrap (``bwrap``): new PID, network, IPC, UTS and cgroup
namespaces, an empty root in which only the system's programs and libraries, the interpreter and the program's own
files are mounted, read-only, a size-limited tmpfs at ``/tmp`` as the only writable path, ``/proc`` of its own PID
namespace, and no environment but ``PATH``, ``HOME``, ``LANG`` and ``TMPDIR``. ``limits_only`` keeps the resource
limits, the scrubbed environment, the fresh directory and the deadline, and nothing else (docs/sandbox.md says what that
leaves open). The limits are put on with util-linux ``prlimit``.

Who the program runs as: when opd runs as root, each worker's programs run as a user of their own (a uid from
``SLOT_UID_BASE`` on, claimed by this process alone: ``WorkerUsers``; bubblewrap starts as root and ``setpriv`` drops
to that user inside), so that they can neither signal the trainer nor read its files. Otherwise they run as opd's own user inside a new user
namespace. Either way the process limit is put on inside the sandbox (``prlimit`` again, as the program's user), where
the kernel counts the sandbox's processes alone: a fork bomb takes its own allowance, never its neighbours'.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SLOT_UID_BASE = 1_900_000  # uids of the sandbox workers when opd runs as root: far from any real account's
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
ISOLATIONS = ("namespaces", "limits_only")
PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate programs as configured; the message says what is missing and what to do."""


@dataclass(frozen=True)
class Limits:
    """What one program may use. ``disk_mb`` is both the size of its writable ``/tmp`` and the largest file it may
    write; ``processes`` counts the processes and threads it runs at once; ``output_kb`` caps stdout and stderr
    together (a program that writes more is stopped)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    disk_mb: int = 64
    processes: int = 32
    open_files: int = 64
    output_kb: int = 1024


def interpreter(python: str | None) -> str:
    """The Python that runs programs: ``python`` as given, else the base interpreter of the one running opd (its
    standard library, none of the trainer's packages)."""
    if python:
        found = shutil.which(python)
        if found is None:
            raise SandboxUnavailable(f"task.sandbox.python: no interpreter at '{python}'")
        return os.path.realpath(found)
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.realpath(base if base.exists() else sys.executable)


def as_root() -> bool:
    return os.geteuid() == 0


UID_RANGE = 4096  # how many sandbox users a machine may have at once, over all of its runs and ranks


class WorkerUsers:
    """The users a sandbox's workers run their programs as, when opd runs as root: each claimed for this process alone
    (an exclusive lock on a file per uid, released when the process ends), so that no two workers — of this run's
    ranks, or of another run on the machine — share one, and one's processes never count against another's limit."""

    def __init__(self, count: int):
        import fcntl
        import tempfile

        self.uids: list[int] = []
        self._locks = []
        if not as_root():
            return
        directory = Path(tempfile.gettempdir()) / "opd-sandbox-users"
        directory.mkdir(mode=0o700, exist_ok=True)
        for uid in range(SLOT_UID_BASE, SLOT_UID_BASE + UID_RANGE):
            if len(self.uids) == count:
                break
            handle = open(directory / f"{uid}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            self.uids.append(uid)
            self._locks.append(handle)
        if len(self.uids) < count:
            raise SandboxUnavailable(f"task.sandbox: no {count} free sandbox users left in uids {SLOT_UID_BASE}-{SLOT_UID_BASE + UID_RANGE - 1} (other runs hold them)")

    def __getitem__(self, slot: int) -> int | None:
        return self.uids[slot] if self.uids else None

    def release(self) -> None:
        for handle in self._locks:
            handle.close()
        self._locks, self.uids = [], []


_TASKS_CACHE: dict[int, tuple[float, int]] = {}  # uid -> (when counted, count): a scan of /proc at most twice a second


def user_tasks(uid: int) -> int:
    """How many processes and threads ``uid`` runs now (what the kernel's process limit counts), counted at most every
    half second."""
    import time

    counted = _TASKS_CACHE.get(uid)
    if counted is not None and time.monotonic() - counted[0] < 0.5:
        return counted[1]
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    _TASKS_CACHE[uid] = (time.monotonic(), count)
    return count


def limit_flags(limits: Limits, processes: int | None) -> list[str]:
    """``prlimit`` and its flags (soft and hard; the CPU limit's hard one second later, so that SIGXCPU comes first and
    names the cause); ``processes``: the process limit, or None to leave it."""
    flags = ["prlimit", f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}", f"--as={limits.memory_mb << 20}", f"--fsize={limits.disk_mb << 20}",
             f"--nofile={limits.open_files}", "--core=0"]
    return flags + ([f"--nproc={processes}"] if processes is not None else []) + ["--"]


def process_limit(limits: Limits) -> list[str]:
    """The process limit put on inside the sandbox, where the kernel counts only the sandbox's own processes (its user
    namespace's, or its worker user's): each sandbox its own ``limits.processes``, whatever its neighbours do."""
    return ["prlimit", f"--nproc={limits.processes}", "--"]


def drop_to(uid: int | None) -> list[str]:
    """``setpriv`` to the worker's own user, with no capabilities and no way to gain any (when opd is root)."""
    if uid is None:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def python_command(python: str, site: bool) -> list[str]:
    """The interpreter in isolated mode (``-I``: no ``PYTHON*`` variables, no user site); without its ``site`` module
    (``-S``, a quarter of the start-up time) when the programs need only the standard library."""
    return [python, "-I"] if site else [python, "-I", "-S"]


def namespaces_command(python: str, program_dir: str, limits: Limits, uid: int | None, site: bool = True, info_fd: int | None = None) -> list[str]:
    """The whole command for ``namespaces``: limits, bubblewrap, (as root) the drop to the worker's user ``uid``, Python.
    ``info_fd``: a descriptor bubblewrap writes to once the sandbox is set up (so that a failure to set it up is told
    apart from the program's own failures)."""
    flags = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--clearenv"]
    flags += ["--info-fd", str(info_fd)] if info_fd is not None else []
    flags += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if as_root() else ["--unshare-user"]
    for key, value in (("PATH", PATH), ("HOME", "/tmp"), ("LANG", "C.UTF-8"), ("TMPDIR", "/tmp")):
        flags += ["--setenv", key, value]
    for directory in SYSTEM_DIRS:
        if os.path.islink(directory):
            flags += ["--symlink", os.readlink(directory), directory]
        elif os.path.isdir(directory):
            flags += ["--ro-bind", directory, directory]
    prefix = Path(python).parent.parent  # <prefix>/bin/python
    if not any(str(prefix) == d or str(prefix).startswith(d + "/") for d in SYSTEM_DIRS):
        for parent in reversed(prefix.parents[:-1]):  # made traversable (bubblewrap copies a host's /root as 0700)
            flags += ["--perms", "0755", "--dir", str(parent)]
        flags += ["--ro-bind", str(prefix), str(prefix)]
    disk = str(limits.disk_mb << 20)
    flags += ["--ro-bind", program_dir, "/sandbox", "--perms", "1777", "--size", disk, "--tmpfs", "/tmp",
              # /dev's own tmpfs would be unbounded and, without root, the program's: its shm sized, the rest read-only
              "--dev", "/dev", "--perms", "1777", "--size", disk, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
              "--proc", "/proc", "--chdir", "/tmp", "--hostname", "sandbox", "--"]
    inside = drop_to(uid) + process_limit(limits)
    return limit_flags(limits, None) + flags + inside + python_command(python, site) + ["/sandbox/main.py"]


def limits_only_command(python: str, program_dir: str, limits: Limits, uid: int | None, site: bool = True, info_fd: int | None = None) -> list[str]:
    """The whole command for ``limits_only``: limits, (as root) the drop to the worker's user ``uid``, Python in the
    program's own directory. Without a user namespace the kernel counts all of the user's processes: as root the
    worker's user has only its own, otherwise the limit is the user's processes now plus ``limits.processes``."""
    main = [os.path.join(program_dir, "main.py")]
    if uid is not None:
        return limit_flags(limits, None) + drop_to(uid) + process_limit(limits) + python_command(python, site) + main
    return limit_flags(limits, user_tasks(os.getuid()) + limits.processes) + python_command(python, site) + main


def scrubbed_env(home: str) -> dict[str, str]:
    """All the environment a program gets (``namespaces`` also clears it inside bubblewrap)."""
    return {"PATH": PATH, "HOME": home, "LANG": "C.UTF-8", "TMPDIR": home}


def fresh_dir(uid: int | None) -> str:
    """A new directory for one program's files, which the worker's user may read (and, for ``limits_only``, write)."""
    directory = tempfile.mkdtemp(prefix="opd-sandbox-")
    try:
        if uid is not None:
            os.chown(directory, uid, uid)
        os.chmod(directory, 0o755)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def check_isolation(isolation: str, python: str, limits: Limits, uid: int | None, site: bool = False) -> None:
    """Refuse, in one line, an isolation this machine cannot give: the tools, then one real sandboxed run under the
    configured ``limits`` as the worker user ``uid``."""
    missing = [tool for tool in ["prlimit"] + (["setpriv"] if as_root() else []) if shutil.which(tool) is None]
    if missing:
        raise SandboxUnavailable(f"task.sandbox: util-linux '{missing[0]}' is not installed, and the sandbox needs it")
    if isolation == "namespaces" and shutil.which("bwrap") is None:
        raise SandboxUnavailable(
            "task.sandbox.isolation=namespaces needs bubblewrap, which is not installed (apt-get install bubblewrap, "
            "dnf install bubblewrap); task.sandbox.isolation=limits_only runs programs with resource limits only"
        )
    directory = fresh_dir(uid)
    try:
        (Path(directory) / "main.py").write_text("print('ok')\n")
        build = namespaces_command if isolation == "namespaces" else limits_only_command
        try:
            done = subprocess.run(build(python, directory, limits, uid, site), capture_output=True, text=True, timeout=60,
                                  env=scrubbed_env(directory), cwd=directory)
            problem = " ".join((done.stderr or done.stdout).split())[:200] if done.returncode or done.stdout.strip() != "ok" else None
        except (OSError, subprocess.TimeoutExpired) as err:
            problem = str(err)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if problem is not None and isolation == "namespaces":
        raise SandboxUnavailable(
            f"task.sandbox.isolation=namespaces: bubblewrap cannot start a sandbox here ({problem}); it needs user "
            "namespaces (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0, or a container that "
            "allows them); task.sandbox.isolation=limits_only runs programs with resource limits only"
        )
    if problem is not None and as_root() and "Permission denied" in problem:
        raise SandboxUnavailable(
            f"task.sandbox.isolation=limits_only: the sandbox's own user (uid {uid}) cannot run {python}, which lies "
            "in a directory private to root; set task.sandbox.python to an interpreter outside it (e.g. /usr/bin/python3)"
        )
    if problem is not None:
        raise SandboxUnavailable(f"task.sandbox: cannot run {python} under its limits here ({problem})")
