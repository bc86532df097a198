"""How a program is isolated: the command that starts it, and whether this machine can isolate it.

``namespaces`` (the default) runs the program under bubblewrap (``bwrap``): new PID, network, IPC, UTS and cgroup
namespaces, an empty root in which only the system's programs and libraries, the interpreter and the program's own
files are mounted, read-only, a size-limited tmpfs at ``/tmp`` as the only writable path, ``/proc`` of its own PID
namespace, and no environment but ``PATH``, ``HOME``, ``LANG`` and ``TMPDIR``. ``limits_only`` keeps the resource
limits, the scrubbed environment, the fresh directory and the deadline, and nothing else (docs/sandbox.md says what that
leaves open). The limits are put on with util-linux ``prlimit``.

Who the program runs as: when opd runs as root, each worker's programs run as a user of their own
(``SLOT_UID_BASE`` + the worker's index; bubblewrap starts as root and ``setpriv`` drops to that user inside), so that
they can neither signal the trainer nor read its files. Otherwise they run as opd's own user inside a new user
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


def slot_uid(slot: int) -> int:
    return SLOT_UID_BASE + slot


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


def drop_to(slot: int) -> list[str]:
    """``setpriv`` to the worker's own user, with no capabilities and no way to gain any (used when opd is root)."""
    uid = slot_uid(slot)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def python_command(python: str, site: bool) -> list[str]:
    """The interpreter in isolated mode (``-I``: no ``PYTHON*`` variables, no user site); without its ``site`` module
    (``-S``, a quarter of the start-up time) when the programs need only the standard library."""
    return [python, "-I"] if site else [python, "-I", "-S"]


def namespaces_command(python: str, program_dir: str, limits: Limits, slot: int, site: bool = True) -> list[str]:
    """The whole command for ``namespaces``: limits, bubblewrap, (as root) the drop to the worker's user, Python."""
    flags = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--clearenv"]
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
    flags += ["--ro-bind", program_dir, "/sandbox", "--perms", "1777", "--size", str(limits.disk_mb << 20), "--tmpfs", "/tmp",
              "--dev", "/dev", "--proc", "/proc", "--chdir", "/tmp", "--hostname", "sandbox", "--"]
    inside = (drop_to(slot) if as_root() else []) + process_limit(limits)
    return limit_flags(limits, None) + flags + inside + python_command(python, site) + ["/sandbox/main.py"]


def limits_only_command(python: str, program_dir: str, limits: Limits, slot: int, site: bool = True) -> list[str]:
    """The whole command for ``limits_only``: limits, (as root) the drop to the worker's user, Python in the program's
    own directory. Without a user namespace the kernel counts all of the user's processes: as root the worker's user
    has only its own, otherwise the limit is the user's processes now plus ``limits.processes``."""
    if as_root():
        return limit_flags(limits, None) + drop_to(slot) + process_limit(limits) + python_command(python, site) + [os.path.join(program_dir, "main.py")]
    return limit_flags(limits, user_tasks(os.getuid()) + limits.processes) + python_command(python, site) + [os.path.join(program_dir, "main.py")]


def scrubbed_env(home: str) -> dict[str, str]:
    """All the environment a program gets (``namespaces`` also clears it inside bubblewrap)."""
    return {"PATH": PATH, "HOME": home, "LANG": "C.UTF-8", "TMPDIR": home}


def fresh_dir(slot: int) -> str:
    """A new directory for one program's files, which the worker's user may read (and, for ``limits_only``, write)."""
    directory = tempfile.mkdtemp(prefix="opd-sandbox-")
    if as_root():
        os.chown(directory, slot_uid(slot), slot_uid(slot))
    os.chmod(directory, 0o755)
    return directory


def check_isolation(isolation: str, python: str, site: bool = False) -> None:
    """Refuse, in one line, an isolation this machine cannot give: the tools, then one real sandboxed run."""
    missing = [tool for tool in ["prlimit"] + (["setpriv"] if as_root() else []) if shutil.which(tool) is None]
    if missing:
        raise SandboxUnavailable(f"task.sandbox: util-linux '{missing[0]}' is not installed, and the sandbox needs it")
    if isolation == "namespaces" and shutil.which("bwrap") is None:
        raise SandboxUnavailable(
            "task.sandbox.isolation=namespaces needs bubblewrap, which is not installed (apt-get install bubblewrap, "
            "dnf install bubblewrap); task.sandbox.isolation=limits_only runs programs with resource limits only"
        )
    directory = fresh_dir(0)
    try:
        (Path(directory) / "main.py").write_text("print('ok')\n")
        build = namespaces_command if isolation == "namespaces" else limits_only_command
        try:
            done = subprocess.run(build(python, directory, Limits(), 0, site), capture_output=True, text=True, timeout=60,
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
            f"task.sandbox.isolation=limits_only: the sandbox's own user (uid {slot_uid(0)}) cannot run {python}, which lies "
            "in a directory private to root; set task.sandbox.python to an interpreter outside it (e.g. /usr/bin/python3)"
        )
    if problem is not None:
        raise SandboxUnavailable(f"task.sandbox: cannot run {python} under its limits here ({problem})")
