"""Programs per second through the sandbox, against the same programs run as plain subprocesses.

    .venv/bin/python benchmarks/bench_sandbox.py                 # 400 programs each way, 2 workers
    .venv/bin/python benchmarks/bench_sandbox.py --programs 1000 --workers 4

Three kinds of program, as a code task's step grades them: a HumanEval-style function checked by five asserts (one
run), a stdin program checked on one case, and a program that fails its tests. Each is run ``--programs`` times
through ``Sandbox`` with ``isolation=namespaces`` (bubblewrap) and ``limits_only``, and as a plain subprocess of the
same interpreter with the same flags (``python -I -S``) and no limits (the baseline: what running a program costs at
all), ``--workers`` at a time in each case.
Prints programs per second and each isolation's time per program against the baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opd.sandbox.checks import RowTests, check_all
from opd.sandbox.isolation import Limits, interpreter, python_command
from opd.sandbox.run import Sandbox

FUNCTION = "def add(a, b):\n    return a + b\n"
FUNCTION_TESTS = RowTests(statements=tuple(f"assert add({i}, {i + 1}) == {2 * i + 1}" for i in range(5)))
PROGRAM = "n = int(input())\nprint(sum(range(n)))\n"
PROGRAM_TESTS = RowTests(cases=(("1000\n", f"{sum(range(1000))}\n"),))
WRONG = "def add(a, b):\n    return a - b\n"


def workload(n: int) -> tuple[list[str], list[RowTests]]:
    kinds = [(FUNCTION, FUNCTION_TESTS), (PROGRAM, PROGRAM_TESTS), (WRONG, FUNCTION_TESTS)]
    picked = [kinds[i % len(kinds)] for i in range(n)]
    return [p for p, _ in picked], [t for _, t in picked]


def plain(programs: list[str], tests: list[RowTests], workers: int, python: str) -> float:
    """The baseline: each program in a fresh directory as ``python -I`` with its input, no isolation and no limits."""

    def run(item) -> None:
        program, t = item
        with tempfile.TemporaryDirectory() as directory:
            source = program + "".join(f"\n{s}" for s in t.statements)
            Path(directory, "main.py").write_text(source)
            stdin = t.cases[0][0] if t.cases else ""
            subprocess.run(python_command(python, site=False) + ["main.py"], cwd=directory, input=stdin, capture_output=True, text=True, timeout=30)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, zip(programs, tests)))
    return time.perf_counter() - started


def sandboxed(programs: list[str], tests: list[RowTests], workers: int, isolation: str, python: str) -> tuple[float, float]:
    sandbox = Sandbox(isolation, Limits(), workers, python)
    started = time.perf_counter()
    verdicts = check_all(sandbox, programs, tests)
    seconds = time.perf_counter() - started
    sandbox.close()
    expected = [t is not FUNCTION_TESTS or p is FUNCTION for p, t in zip(programs, tests)]
    assert [v.all_passed for v in verdicts] == expected, "a verdict differs from the programs' known results"
    return seconds, sum(v.all_passed for v in verdicts) / len(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--python", default=None, help="the interpreter (default: opd's base interpreter; as root, one outside /root)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    programs, tests = workload(args.programs)
    python = interpreter(args.python)
    results = {"programs": args.programs, "workers": args.workers, "cpus": os.cpu_count(), "root": os.geteuid() == 0}
    results["plain_s"] = plain(programs, tests, args.workers, python)
    for isolation in ("namespaces", "limits_only"):
        seconds, _ = sandboxed(programs, tests, args.workers, isolation, python)
        results[f"{isolation}_s"] = seconds
    print(f"{args.programs} programs, {args.workers} workers, {os.cpu_count()} CPUs ({'root' if results['root'] else 'not root'}), {python}")
    print(f"{'how':<24} {'programs/s':>10} {'ms/program':>11} {'vs plain':>9}")
    for how in ("plain", "limits_only", "namespaces"):
        seconds = results[f"{how}_s"]
        print(f"{how:<24} {args.programs / seconds:>10.1f} {1000 * seconds / args.programs * args.workers:>11.1f} "
              f"{seconds / results['plain_s']:>8.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
