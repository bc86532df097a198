"""What a resumed run may change: settings that alter the trajectory are refused unless explicitly allowed, and
every change is recorded; the checkpoint a resume starts from must fit the run (its step, its micro-batches).

The run's resolved config is saved as ``<run>/config.yaml`` when it starts; on resume the new
config is compared with it key by key (both redacted the same way).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from ..config.history import migrate_saved, trajectory_view
from ..config.saving import redact, to_dict
from ..parallel.launchers import launched_world
from .checkpoints import CHECKPOINT_PREFIX

log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """The output directory holds a run that this one would overwrite, or cannot be resumed as asked."""

# keys that change what is logged, kept or evaluated, or how the same gradient is computed (where, in how many
# passes, with which kernels: equal up to float rounding and dropout's draws), but not the training trajectory
NEUTRAL = (
    "run.resume", "run.overwrite", "run.allow_changes", "run.name", "run.time_limit", "log.", "checkpoint.", "eval.", "train.threads",
    "train.dist_timeout", "train.sharding", "train.gradient_checkpointing", "train.micro_batch_tokens", "train.packing",
    "student.attn_implementation", "teacher.attn_implementation",
    # how a remote service is waited for, not what it answers (docs/cluster.md)
    "teacher.deadline", "teacher.retries", "teacher.concurrency", "teacher.max_reply_mb", "teacher.outage",
    "method.ovd.http.deadline", "method.ovd.http.retries", "method.ovd.http.backoff", "method.ovd.http.max_reply_mb",
    "method.ovd.http.outage", "task.retriever_deadline", "task.retriever_retries", "task.retriever_outage",
)  # not teacher.device: a teacher elsewhere samples its demonstrations from a generator of its own device


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): list(tree) if isinstance(tree, tuple) else tree}


def trajectory_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key that differs and alters the trajectory (the subsections of the
    methods and engines neither run uses left out)."""
    before, after = flatten(trajectory_view(saved)), flatten(trajectory_view(current))
    changes = []
    for key in sorted(set(before) | set(after)):
        if key.startswith(NEUTRAL) or before.get(key) == after.get(key):
            continue
        changes.append((key, before.get(key), after.get(key)))
    return changes


def read_saved_config(run_dir: Path) -> dict | None:
    """The run's saved config tree, keys renamed or added since read as the run meant them; None if unreadable."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return migrate_saved(saved) if isinstance(saved, dict) else None


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    shown = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes[:5])
    return shown + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")


def record(run_dir: Path, step: int, changes: list[tuple[str, Any, Any]]) -> None:
    """Append the allowed changes to ``<run>/resume_changes.jsonl``."""
    row = {"resumed_at_step": step, "changes": {key: {"from": old, "to": new} for key, old, new in changes}}
    with open(run_dir / "resume_changes.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")


def check_resume(cfg, run_dir: Path, checkpoint: Path) -> list[tuple[str, Any, Any]]:
    """Refuse a resume whose settings would not continue the same run; the allowed changes otherwise (``record``
    writes them once the resumed run has started, so that a resume that fails before then leaves no entry)."""
    step = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))
    if step > cfg.train.steps:
        raise RunDirError(f"the newest checkpoint is at step {step}, past train.steps={cfg.train.steps}; resume with train.steps >= {step}")
    saved = read_saved_config(run_dir)
    if saved is None:
        log.warning("%s has no readable config.yaml; cannot check what this resume changes", run_dir)
        return []
    changes = [c for c in trajectory_changes(saved, redact(to_dict(cfg))) if not same_micro_batches(c, cfg, checkpoint)]
    if changes and not cfg.run.allow_changes:
        raise RunDirError(
            f"resuming {run_dir} with settings that alter the run: {describe(changes)}; "
            "pass run.allow_changes=true to resume anyway (the changes are recorded in resume_changes.jsonl)"
        )
    if changes:
        log.warning("resuming with changed settings: %s", describe(changes))
    return changes


def same_micro_batches(change: tuple, cfg, checkpoint: Path) -> bool:
    """A ``train.grad_accum`` change that keeps ranks × grad_accum (e.g. 2 ranks × 1 resumed as 1 process × 2):
    the same micro-batches with the same noise, so not a change of the run."""
    if change[0] != "train.grad_accum":
        return False
    try:
        saved = json.loads((checkpoint / "state.json").read_text()).get("micro_batches_per_step", change[1])
    except (OSError, ValueError):
        return False
    return saved == cfg.train.grad_accum * launched_world()[1]


def check_micro_batches(cfg, saved: int, micro_batches: int, checkpoint: Path) -> None:
    """Each micro-batch draws its own sampling noise, so ranks × grad_accum is part of the trajectory: a resume
    on another number of ranks continues the same run only when the product is unchanged (a checkpoint without
    the count comes from one process: its grad_accum)."""
    if saved == micro_batches:
        return
    message = (
        f"{checkpoint} was written with {saved} micro-batches per step (ranks x train.grad_accum) and this resume has "
        f"{micro_batches}; launch it with ranks x train.grad_accum = {saved}"
    )
    if not cfg.run.allow_changes:
        raise RunDirError(message + ", or pass run.allow_changes=true")
    log.warning("%s; continuing (run.allow_changes=true)", message)
