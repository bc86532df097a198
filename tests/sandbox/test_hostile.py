"""Hostile programs through the code task's grading, in real sandboxes (bubblewrap, real processes): a fork bomb, an
infinite loop, a memory bomb, a connection to a listener this test opens on loopback, a write outside the sandbox,
reading a secret from the trainer's environment, 1 GB of output, killing its parent, sleeping past the deadline, and a
child left running after the program exits. Each scores 0 with its reason counted in the step's metrics; the trainer
(this process) is unharmed, the sandbox still grades a good program afterwards, and nothing is left running.

Where an attack would succeed, the program's function would come out right, so a reward of 0 is itself the evidence
that it failed; the test also looks for the attack's effect directly (the connection, the file, the secret)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from opd.config.loading import load_config
from opd.sandbox.isolation import SLOT_UID_BASE
from opd.tasks import build_task

LIMITS = ["task.sandbox.deadline=4", "task.sandbox.cpu_seconds=3", "task.sandbox.memory_mb=256", "task.sandbox.output_kb=64",
          "task.sandbox.processes=16"]
SECRET = "opd-test-secret-4f1c9a"


def code_task(tmp_path, *overrides):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "f(x) doubles x", "test": ["assert f(1) == 2", "assert f(2) == 4"]}) + "\n")
    cfg = load_config(None, ["task.name=code", f"task.path={rows}", f"task.eval_path={rows}", "student.path=world:student",
                             "teacher.path=world:teacher", *LIMITS, *overrides])
    return build_task(cfg.task)


def program(body: str) -> str:
    return f"```python\n{body}\n```"


def own_pid_namespace() -> str:
    return os.readlink("/proc/self/ns/pid")


def leftovers(patience_s: float = 3.0) -> list[int]:
    """Processes a sandbox left behind, alive (not a zombie) ``patience_s`` after it ended: any in another PID namespace,
    or run by a sandbox worker's user (the kernel kills a namespace's processes when it ends, but not instantly)."""
    deadline = time.monotonic() + patience_s
    while True:
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                foreign = os.readlink(f"/proc/{entry.name}/ns/pid") != own_pid_namespace() or entry.stat().st_uid >= SLOT_UID_BASE
                state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if foreign and state not in ("Z", "X"):
                found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


class Listener:
    """A TCP listener on loopback that records every connection made to it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port, self.connections, self.stopped = self.sock.getsockname()[1], 0, False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                continue

    def close(self):
        self.stopped = True
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def attacks(tmp_path_factory):
    """Every hostile program graded in one call (all at once, as a step grades its samples); the evidence each left."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    outside = tmp_path / "written_from_the_sandbox"
    listener = Listener()
    os.environ["OPD_TEST_SECRET"] = SECRET  # the trainer's environment, as a token would be
    trainer = os.getpid()
    bodies = {
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "infinite loop": "while True:\n    pass",
        "memory bomb": "hoard = []\nwhile True:\n    hoard.append(bytearray(50 * 2**20))",
        "loopback connection": (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {listener.port}), timeout=2).close()\n    reached = True\n"
            "except OSError:\n    reached = False\ndef f(x):\n    return 2 * x if reached else 0"
        ),
        "write outside": (  # the test's own directory, and /dev (its own tmpfs, read-only: unbounded otherwise)
            "wrote = False\n"
            f"for path in ({str(outside)!r}, '/dev/escaped', '/sandbox/escaped'):\n"
            "    try:\n        open(path, 'w').write('escaped')\n        wrote = True\n    except OSError:\n        pass\n"
            "def f(x):\n    return 2 * x if wrote else 0"
        ),
        "read the trainer's secret": (
            "import glob, os\nfound = os.environ.get('OPD_TEST_SECRET', '')\n"
            f"for path in glob.glob('/proc/*/environ') + ['/proc/{trainer}/environ']:\n"
            "    try:\n        found += open(path, 'rb').read().decode(errors='replace')\n    except OSError:\n        pass\n"
            f"print(found[-200:])\ndef f(x):\n    return 2 * x if {SECRET!r} in found else 0"
        ),
        "a gigabyte of output": "import sys\nchunk = 'x' * 65536\nfor _ in range(2**14):\n    sys.stdout.write(chunk)",
        "kill its parent": (
            "import os, signal\nfor target in (os.getppid(), 1, " + str(trainer) + "):\n    try:\n        os.kill(target, signal.SIGKILL)\n"
            "    except OSError:\n        pass\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
            f"def f(x):\n    return 2 * x if os.getppid() != 1 and not os.path.exists('/proc/{trainer}') else 0"
        ),
        "sleep past the deadline": "import time\ntime.sleep(60)",
        "a child left running": (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\n"
            "def f(x):\n    return 0"
        ),
    }
    task = code_task(tmp_path, "task.sandbox.workers=10")
    example = task.eval_examples()[0]
    started = time.monotonic()
    rewards, metrics = task.rewards([program(b) for b in bodies.values()], [example] * len(bodies))
    seconds = time.monotonic() - started
    good = task.grade([program("def f(x):\n    return 2 * x")], [example])[0]
    evidence = {"outside": outside.exists(), "connections": listener.connections, "leftovers": leftovers(), "seconds": seconds}
    listener.close()
    del os.environ["OPD_TEST_SECRET"]
    yield dict(zip(bodies, rewards)), metrics, evidence, task, good
    task.sandbox.close()


@pytest.mark.parametrize("attack", [
    "fork bomb", "infinite loop", "memory bomb", "loopback connection", "write outside", "read the trainer's secret",
    "a gigabyte of output", "kill its parent", "sleep past the deadline", "a child left running",
])
def test_a_hostile_program_scores_zero(attacks, attack):
    rewards, _, _, _, _ = attacks
    assert rewards[attack] == 0.0


def test_each_failure_is_counted_by_its_reason(attacks):
    """The shares of the ten programs by reason, as the step logs them: the run-time limits that stopped five of them,
    and the five that ran to the end with nothing to show for it."""
    _, metrics, _, _, _ = attacks
    assert metrics["code/passed"] == 0.0
    assert metrics.get("code/output_limit") == pytest.approx(0.1)  # the gigabyte of output, stopped at 64 KiB
    assert metrics.get("code/memory") == pytest.approx(0.1)
    assert metrics.get("code/timeout", 0) + metrics.get("code/cpu_time", 0) == pytest.approx(0.3)  # bomb, loop, sleep
    assert metrics.get("code/wrong") == pytest.approx(0.5)  # the five whose attack failed, so their f is wrong


def test_nothing_escaped_and_nothing_is_left_running(attacks):
    _, _, evidence, _, _ = attacks
    assert not evidence["outside"] and evidence["connections"] == 0
    assert evidence["leftovers"] == []


def test_the_deadline_holds_and_the_sandbox_still_grades_a_good_program(attacks):
    _, _, evidence, _, good = attacks
    assert evidence["seconds"] < 4 + 3  # the deadline (4 s) with room for a busy machine: nothing outlived it
    assert good.all_passed


def test_a_program_without_a_code_block_is_no_code(tmp_path):
    task = code_task(tmp_path)
    example = task.eval_examples()[0]
    rewards, metrics = task.rewards(["def f(x): return 2 * x", program("def f(x):\n    return 2 * x")], [example, example])
    assert rewards == [0.0, 1.0] and metrics["code/no_code"] == 0.5 and metrics["code/passed"] == 0.5
    task.sandbox.close()


def test_limits_only_still_scrubs_the_environment_and_enforces_the_limits(tmp_path, monkeypatch):
    """Without namespaces (a machine without them, and the user's say-so): the secret stays out, the deadline and the
    memory and output limits still stop a program."""
    monkeypatch.setenv("OPD_TEST_SECRET", SECRET)
    # as root, programs run as the worker's own user, which cannot reach an interpreter in root's home
    python = ["task.sandbox.python=/usr/bin/python3"] if os.geteuid() == 0 and Path("/usr/bin/python3").exists() else []
    task = code_task(tmp_path, "task.sandbox.isolation=limits_only", "task.sandbox.workers=4", *python)
    example = task.eval_examples()[0]
    bodies = [
        f"import os\ndef f(x):\n    return 2 * x if {SECRET!r} in str(os.environ) else 0",
        "import time\ntime.sleep(60)",
        "hoard = []\nwhile True:\n    hoard.append(bytearray(50 * 2**20))",
        "while True:\n    print('x' * 1000)",
    ]
    verdicts = task.grade([program(b) for b in bodies], [example] * len(bodies))
    assert [v.reason for v in verdicts] == ["wrong", "timeout", "memory", "output_limit"]
    task.sandbox.close()


def test_a_machine_without_bubblewrap_is_one_line_naming_the_key_and_the_way_out(tmp_path, monkeypatch):
    import opd.sandbox.isolation as isolation
    from opd.tasks.rows import DataError

    real = isolation.shutil.which
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None if name == "bwrap" else real(name))
    with pytest.raises(DataError, match=r"^task.sandbox.isolation=namespaces needs bubblewrap, which is not installed .*limits_only"):
        code_task(tmp_path)


def test_program_rows_compare_stdout_case_by_case(tmp_path):
    rows = tmp_path / "programs.jsonl"
    rows.write_text(json.dumps({"problem": "print n squared", "inputs": ["3\n", "4\n", "5\n"], "outputs": ["9\n", "16", "25\n\n"]}) + "\n")
    cfg = load_config(None, ["task.name=code", f"task.path={rows}", f"task.eval_path={rows}", "task.reward=pass_fraction",
                             "student.path=world:student", "teacher.path=world:teacher"])
    task = build_task(cfg.task)
    example = task.eval_examples()[0]
    right, off_by_one = program("n = int(input())\nprint(n * n)  "), program("n = int(input())\nprint(n * n if n != 4 else 15)")
    rewards, metrics = task.rewards([right, off_by_one], [example, example])
    assert rewards == [1.0, pytest.approx(2 / 3)] and metrics["code/tests_passed"] == pytest.approx(5 / 6)
    task.sandbox.close()


def test_a_row_without_tests_is_refused_naming_it_and_the_fields(tmp_path):
    from opd.tasks.rows import DataError

    rows = tmp_path / "untested.jsonl"
    rows.write_text(json.dumps({"prompt": "write f"}) + "\n")
    with pytest.raises(DataError, match=r"untested.jsonl:1: no tests: a function row needs 'test'"):
        build_task(load_config(None, ["task.name=code", f"task.path={rows}", f"task.eval_path={rows}", "student.path=world:student",
                                      "teacher.path=world:teacher"]).task)
