"""A row's tests, run against the program a completion holds (docs/data.md, "Code").

Two kinds of row: **functions** (HumanEval / MBPP style: the program defines a function; each test is Python run after
it with its names in scope — HumanEval's ``check(candidate)`` code plus ``check(<entry point>)``, or each of MBPP's
``assert`` lines) and **programs** (APPS / CodeContests / LiveCodeBench style: the program reads stdin; each test is
an input and the output expected, compared line by line with trailing whitespace ignored). ``Verdict`` says how many
tests passed and why the others did not.

A function's tests run in the same interpreter as the program, one after another, each reporting its result on its own
line marked with a random token; a test after one that hangs or crashes the interpreter counts as failed. The program
can read that file, so a program written to game its own grading can: the sandbox protects the machine, not the
reward (docs/sandbox.md).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from .run import Job, Outcome, Sandbox

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_TAGS = ("python", "py", "python3", "")  # a block tagged otherwise (```text, ```output) is not the program

FUNCTION_HARNESS = """\
import json, os, sys, traceback
MARK = {mark!r}
HERE = os.path.dirname(os.path.abspath(__file__))
out = sys.__stdout__
with open(os.path.join(HERE, "tests.json")) as handle:
    tests = json.load(handle)
scope = {{"__name__": "__solution__"}}
try:
    with open(os.path.join(HERE, "program.py")) as handle:
        exec(compile(handle.read(), "program.py", "exec"), scope)
except BaseException:
    traceback.print_exc()
    sys.exit(1)
for i, test in enumerate(tests):
    try:
        exec(compile(test, "test %d" % i, "exec"), dict(scope))
        passed = 1
    except BaseException:
        passed = 0
    out.write("\\n%s %d %d\\n" % (MARK, i, passed))  # a line of its own, whatever the program printed last
    out.flush()
"""


def extract_program(completion: str, pattern: re.Pattern | None = None) -> str | None:
    """The program in a completion: the first group of ``pattern``'s last match when a pattern is given, else the
    last fenced code block tagged as Python or not at all (```python … ```, ``` … ```; the last block of any tag when
    there is no such block); None when there is none."""
    if pattern is not None:
        matches = list(pattern.finditer(completion))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if pattern.groups else last.group(0)
    blocks = FENCE.findall(completion)
    python = [code for tag, code in blocks if tag.lower() in PYTHON_TAGS]
    return python[-1] if python else blocks[-1][1] if blocks else None


@dataclass(frozen=True)
class RowTests:
    """What a row checks: ``statements`` (a function row's tests, each Python run after the program) or ``cases``
    (a program row's ``(stdin, expected stdout)`` pairs)."""

    statements: tuple[str, ...] = ()
    cases: tuple[tuple[str, str], ...] = ()

    @property
    def count(self) -> int:
        return len(self.statements) + len(self.cases)


@dataclass
class Verdict:
    passed: int
    total: int
    reason: str  # passed, wrong (a test failed), no_code, or how a run ended (timeout, memory, ...: run.STATUSES)
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def same_output(got: str, expected: str) -> bool:
    """Outputs equal line by line, trailing spaces and trailing blank lines aside."""
    lines = lambda text: [line.rstrip() for line in text.rstrip().splitlines()]  # noqa: E731
    return lines(got) == lines(expected)


def jobs_for(program: str, tests: RowTests) -> tuple[list[Job], str | None]:
    """The runs that check ``program`` — one for all of a function row's tests, one per case of a program row — and
    the token a function row's harness marks its results with (None for a program row)."""
    if tests.statements:
        mark = secrets.token_hex(8)
        files = {"main.py": FUNCTION_HARNESS.format(mark=mark), "program.py": program, "tests.json": json.dumps(list(tests.statements))}
        return [Job(files)], mark
    return [Job({"main.py": program}, stdin) for stdin, _ in tests.cases], None


def verdict(tests: RowTests, outcomes: list[Outcome], mark: str | None) -> Verdict:
    """How many of ``tests`` the runs passed, and the reason for the first that did not."""
    if tests.statements:
        outcome = outcomes[0]
        results = {}
        for line in outcome.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == mark and parts[1].isdigit():
                results[int(parts[1])] = parts[2] == "1"
        passed = sum(results.get(i, False) for i in range(len(tests.statements)))
        cut_short = outcome.status != "ok" and len(results) < len(tests.statements)
        reason = "passed" if passed == len(tests.statements) else outcome.status if cut_short else "wrong"
        return Verdict(passed, len(tests.statements), reason, outcomes)
    passed, reason = 0, "passed"
    for (_, expected), outcome in zip(tests.cases, outcomes):
        if outcome.status == "ok" and same_output(outcome.stdout, expected):
            passed += 1
        elif reason == "passed":
            reason = outcome.status if outcome.status != "ok" else "wrong"
    return Verdict(passed, len(tests.cases), reason, outcomes)


def check_all(sandbox: Sandbox, programs: list[str | None], tests: list[RowTests]) -> list[Verdict]:
    """Every program against its tests, all runs through ``sandbox`` at once (``workers`` in parallel); a missing
    program (no code block) fails every test without running."""
    plans = [jobs_for(program, t) if program is not None else ([], None) for program, t in zip(programs, tests)]
    outcomes = iter(sandbox.run_all([job for jobs, _ in plans for job in jobs]))
    verdicts = []
    for program, t, (jobs, mark) in zip(programs, tests, plans):
        if program is None:
            verdicts.append(Verdict(0, t.count, "no_code"))
        else:
            verdicts.append(verdict(t, [next(outcomes) for _ in jobs], mark))
    return verdicts
