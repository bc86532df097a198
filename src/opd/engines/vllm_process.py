"""A vLLM OpenAI-compatible server in a process of its own, started and stopped by opd.

``VLLMProcess`` runs ``python -m vllm.entrypoints.openai.api_server`` with the given arguments on loopback,
in its own process group (so stopping it stops its engine core too), with the parent-death signal set on
Linux (a trainer killed with SIGKILL takes its server with it), on the CPU cores it is given, its caches and sockets in a scratch
directory (emptied when it stops), and its log in a file that outlives it (named in every error about it).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup(cpus: Sequence[int] | None, die_with_parent: bool):
    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        os.setsid()
        if die_with_parent:
            try:
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            except OSError:
                pass
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class VLLMProcess:
    """One vLLM server process: ``start()`` launches it, ``wait_ready()`` waits for its model list, ``stop()`` ends it.

    ``args``: the server's arguments after the module (``--model …``); ``env``: variables set for it on top of
    this process's environment; ``python``: the interpreter (None: this one); ``cpus``: the CPU cores it and its
    children may run on (None: this process's); ``die_with_parent``: SIGTERM it when the thread that started it
    ends (Linux's parent-death signal belongs to that thread, so start it from one that lives as long as the run:
    opd starts it from the main thread)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, python: str | None = None, port: int | None = None,
                 cpus: Sequence[int] | None = None, die_with_parent: bool = True):
        self.port, self.cpus, self.die_with_parent = port or free_port(), list(cpus) if cpus else None, die_with_parent
        self.scratch = tempfile.mkdtemp(prefix="opd-vllm-server-")
        self.log_path = Path(self.scratch) / "server.log"
        self.command = [python or sys.executable, "-m", SERVER_MODULE, *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {
            **os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CACHE_ROOT": os.path.join(self.scratch, "cache"),
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(self.scratch, "inductor"), "VLLM_RPC_BASE_PATH": self.scratch, "TMPDIR": self.scratch,
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VLLMProcess:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_child_setup(self.cpus, self.die_with_parent),
        )
        return self

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        """Return once the server lists its models; raise ``RuntimeError`` (naming the log) if it exits or takes longer
        than ``timeout`` seconds (then it is stopped)."""
        import httpx2

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                last = self.log_tail(600).strip().splitlines()[-1:] or ["(no output)"]
                raise RuntimeError(f"the vLLM server exited with status {code} while starting; last line: {last[0][:300]} (log: {self.log_path})")
            try:
                if httpx2.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer within {timeout:g} s of starting (log: {self.log_path})")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and everything it started: gone at once, as a crashed node is."""
        self._signal(signal.SIGKILL, 30)

    def stop(self, grace: float = 30) -> None:
        """SIGTERM the server's process group; SIGKILL what is left after ``grace`` seconds."""
        if not self._signal(signal.SIGTERM, grace):
            self._signal(signal.SIGKILL, 30)

    def _signal(self, sig: int, wait: float) -> bool:
        if self.process is None:
            return True
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                return False
        try:  # the engine core and any other child left in the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        for entry in Path(self.scratch).iterdir():  # its caches and sockets; the log stays (errors name it)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry != self.log_path:
                entry.unlink(missing_ok=True)
        return True
