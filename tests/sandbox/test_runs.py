"""How the sandbox runs ordinary programs: a function's report survives what the program printed, the program is the
last Python block, HumanEval's check is found only where it is defined, each worker has a user of its own, and a
program that neither reads its input nor lets go of its pipes cannot hold the trainer past the deadline."""

from __future__ import annotations

import os
import signal
import time

import pytest

from opd.sandbox.checks import RowTests, check_all, extract_program
from opd.sandbox.isolation import SLOT_UID_BASE, Limits
from opd.sandbox.run import Job, Sandbox


@pytest.fixture(scope="module")
def sandbox():
    sandbox = Sandbox(workers=2, limits=Limits(wall_s=4))
    yield sandbox
    sandbox.close()


def test_a_function_that_prints_without_a_newline_is_still_graded(sandbox):
    program = "import sys\ndef f(x):\n    sys.stdout.write('chatty')\n    return 2 * x\n"
    [verdict] = check_all(sandbox, [program], [RowTests(statements=("assert f(1) == 2", "assert f(3) == 6"))])
    assert verdict.all_passed


def test_the_program_is_the_last_python_block_not_a_later_output_block():
    text = "Here:\n```python\ndef f(x):\n    return 1\n```\nIt prints:\n```text\n1\n```"
    assert extract_program(text) == "def f(x):\n    return 1\n"
    assert extract_program("```\nprint(2)\n```") == "print(2)\n" and extract_program("no code") is None


def test_humaneval_check_is_called_only_where_the_test_defines_it():
    from opd.tasks.code import CHECK_FUNCTION

    assert CHECK_FUNCTION.search("METADATA = {}\n\ndef check(candidate):\n    assert candidate(1)")
    assert not CHECK_FUNCTION.search("def checker(x):\n    return x\nassert checker(1)")


@pytest.mark.skipif(os.geteuid() != 0, reason="workers get users of their own only when opd runs as root")
def test_every_worker_of_every_sandbox_runs_as_a_user_of_its_own(sandbox):
    other = Sandbox(workers=2)
    try:
        uids = {int(o.stdout) for o in sandbox.run_all([Job({"main.py": "import os\nprint(os.getuid())"})] * 4)}
        others = {int(o.stdout) for o in other.run_all([Job({"main.py": "import os\nprint(os.getuid())"})] * 4)}
        assert uids <= set(sandbox.users.uids) and others <= set(other.users.uids)
        assert not set(sandbox.users.uids) & set(other.users.uids) and min(uids | others) >= SLOT_UID_BASE
    finally:
        other.close()


def test_a_program_holding_its_pipes_open_cannot_hold_the_trainer(tmp_path):
    """limits_only, where a setsid child escapes the group's kill: it keeps stdin (1 MB the program never reads),
    stdout and stderr open; the run still ends at its deadline."""
    python = ["/usr/bin/python3"] if os.geteuid() == 0 and os.path.exists("/usr/bin/python3") else [None]
    sandbox = Sandbox("limits_only", Limits(wall_s=2), workers=1, python=python[0])
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(20)\n"
    started = time.monotonic()
    try:
        outcome = sandbox.run(Job({"main.py": program}, stdin="x" * (1 << 20)))
    finally:
        sandbox.close()
    assert outcome.status == "timeout" and time.monotonic() - started < 2 + 2
    for entry in os.scandir("/proc"):  # the escaped child, which limits_only cannot catch (docs/sandbox.md)
        if entry.name.isdigit():
            try:
                if b"opd-sandbox-" in open(f"/proc/{entry.name}/cmdline", "rb").read():
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass
