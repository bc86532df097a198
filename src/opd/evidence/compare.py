"""``opd compare``: run claim sets (and plain configs) over several seeds, then write the evidence report.

Each distinct configuration (after the command line's overrides; the seed, run directory and thread count aside)
is one arm run once per seed under ``OUT/runs/<label>-<hash>/seed<k>``, however many claims use it. Runs go in
parallel, ``--jobs`` at a time with ``--threads`` each (default: one thread, as many jobs as cores). A run with a
``summary.json`` is finished and skipped; an unfinished one resumes from its newest checkpoint (``run.resume``)
or starts again. The report (``report.write_report``) reads only what the runs wrote.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config.history import trajectory_view
from ..config.loading import load_config
from ..config.saving import to_dict
from ..config.sections import ConfigError
from .claims import CLAIM_FILE, Claim, load_claim

log = logging.getLogger(__name__)

PER_RUN_KEYS = (("run", "seed"), ("run", "output_dir"), ("run", "name"), ("run", "resume"), ("run", "overwrite"), ("train", "threads"), ("log", "progress_bar"))


@dataclass
class Arm:
    label: str
    config: Path
    key: str  # hash of the resolved configuration: equal configs share their runs
    labels: list[str] = field(default_factory=list)  # every claim label this arm goes by

    def run_dir(self, out: Path, seed: int) -> Path:
        """``OUT/runs/<label>-<key>/seed<k>``; an existing directory of the same configuration under another label
        (an earlier call named it differently) is reused, so its finished runs are not repeated."""
        existing = sorted((out / "runs").glob(f"*-{self.key}")) if (out / "runs").is_dir() else []
        home = existing[0] if existing and not (out / "runs" / f"{self.label}-{self.key}").is_dir() else out / "runs" / f"{self.label}-{self.key}"
        return home / f"seed{seed}"


@dataclass
class Plan:
    claims: list[Claim]
    arms: list[Arm]  # distinct configurations, in order of first mention
    arm_of: dict[tuple[str, str], Arm]  # (claim name or "", label) -> arm
    seeds: list[int]
    overrides: list[str]


def config_key(path: Path, overrides: list[str]) -> str:
    """Hash of ``path``'s configuration with ``overrides``, leaving out what differs between the runs of one arm.
    Loading validates it, so a broken arm fails here, before any run starts."""
    try:
        config = load_config(path, overrides)
    except ConfigError as err:  # several configs at once: say which one
        raise ConfigError(f"{path}: {err}") from None
    data = trajectory_view(to_dict(config))  # other methods' and engines' keys change nothing
    for section, key in PER_RUN_KEYS:
        data.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]


def make_plan(paths: list[str], seeds: int, overrides: list[str], first_seed: int = 0) -> Plan:
    """Claim sets (directories with ``claim.yaml``) and config files, each arm checked by loading its config."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    claims, arms, arm_of, by_key = [], [], {}, {}
    for item in paths:
        p = Path(item)
        if p.is_dir() or p.name == CLAIM_FILE:
            claim = load_claim(p if p.is_dir() else p.parent)
            claims.append(claim)
            entries = [(claim.name, label, cfg) for label, cfg in claim.arms.items()]
        elif p.is_file():
            label, n = p.stem, 2
            while ("", label) in arm_of:  # two configs with one file name (a/opd.yaml, b/opd.yaml)
                label, n = f"{p.stem}_{n}", n + 1
            entries = [("", label, p.resolve())]
        else:
            raise ConfigError(f"{item}: neither a config file nor a claim set directory")
        for claim_name, label, cfg in entries:
            key = config_key(cfg, overrides)
            if key not in by_key:
                by_key[key] = Arm(label, cfg, key)
                arms.append(by_key[key])
            arm = by_key[key]
            if label not in arm.labels:
                arm.labels.append(label)
            arm_of[(claim_name, label)] = arm
    return Plan(claims, arms, arm_of, list(range(first_seed, first_seed + seeds)), list(overrides))


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def run_command(arm: Arm, run_dir: Path, seed: int, overrides: list[str], threads: int) -> list[str]:
    return [
        sys.executable, "-m", "opd", "train", str(arm.config), *overrides,
        f"run.seed={seed}", f"run.output_dir={run_dir}", "run.resume=true", "run.overwrite=true",
        f"train.threads={threads}", "log.progress_bar=false",
    ]


def run_one(arm: Arm, run_dir: Path, seed: int, overrides: list[str], threads: int) -> tuple[bool, str]:
    """Train one seed of ``arm`` in a child process (output to ``run_dir/log.txt``); ``(ok, last lines of its log)``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir / "log.txt", "ab") as logf:
        code = subprocess.run(run_command(arm, run_dir, seed, overrides, threads), stdout=logf, stderr=subprocess.STDOUT, env=env).returncode
    tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
    return code == 0 and finished(run_dir), "\n".join(tail)


def run_plan(plan: Plan, out: Path, jobs: int, threads: int, echo=print) -> list[str]:
    """Run every unfinished (arm, seed); return a line per failed run."""
    todo = [(arm, seed) for arm in plan.arms for seed in plan.seeds if not finished(arm.run_dir(out, seed))]
    done = len(plan.arms) * len(plan.seeds) - len(todo)
    echo(f"{len(plan.arms)} arms × {len(plan.seeds)} seeds: {done} finished already, {len(todo)} to run ({jobs} at a time, {threads} thread(s) each)")
    failures = []
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_one, arm, arm.run_dir(out, seed), seed, plan.overrides, threads): (arm, seed) for arm, seed in todo}
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            arm, seed = futures[future]
            ok, tail = future.result()
            echo(f"[{n}/{len(todo)}, {time.time() - started:.0f} s] {arm.label} seed {seed}: {'done' if ok else 'FAILED'}")
            if not ok:
                failures.append(f"{arm.label} seed {seed} ({arm.run_dir(out, seed)}/log.txt): {tail.splitlines()[-1] if tail else 'no output'}")
    return failures


def default_jobs(threads: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, threads))


def compare(paths: list[str], seeds: int, out: str | Path, overrides: list[str] = (), jobs: int | None = None,
            threads: int = 1, docs: str | Path | None = None, command: str = "", echo=print) -> tuple[Path, list[str]]:
    """Plan, run what is unfinished, write the report; ``(report.md path, failed runs)``."""
    from .report import write_report

    out = Path(out)
    plan = make_plan(list(paths), seeds, list(overrides))
    failures = run_plan(plan, out, jobs or default_jobs(threads), threads, echo)
    report = write_report(plan, out, command=command, docs=Path(docs) if docs else None)
    return report, failures
