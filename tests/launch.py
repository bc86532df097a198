"""Real processes for the tests: ``torchrun`` launches of ``opd train`` (or any module) on loopback, and killing one
of their ranks with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target: list[str], ranks: int = 2) -> list[str]:
    """The command launching ``target`` (``["-m", "opd", ...]`` or a script and its arguments) on ``ranks`` processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), *target,
    ]


def opd_train(config: Path, args: list[str]) -> list[str]:
    return ["-m", "opd", "train", str(config), *args]


def one_process(config: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``opd train`` in one process (no launcher variables inherited)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run([sys.executable, *opd_train(config, args)], env=env, capture_output=True, text=True, timeout=timeout)


def two_ranks(config: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(opd_train(config, args)), capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def kill_rank_one_after(config: Path, args: list[str], run: Path, step: int, timeout: float = 240) -> int:
    """Launch 2 ranks, SIGKILL rank 1 once the checkpoint of ``step`` exists, and wait for torchrun to report it."""
    launcher = subprocess.Popen(torchrun(opd_train(config, args)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not (run / "checkpoints" / f"step-{step:06d}").exists():
            assert launcher.poll() is None and time.time() < deadline, f"the run ended before step {step}"
            time.sleep(0.01)
        victim = rank_pid(launcher.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, "torchrun should report the killed rank"
    return step


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker process ``parent`` (torchrun) started with ``RANK=rank``."""
    for proc in Path("/proc").iterdir():
        try:
            ppid = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            env = proc.joinpath("environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None
