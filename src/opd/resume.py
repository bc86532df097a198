"""What a resumed run may change: settings that alter the trajectory are refused unless explicitly allowed, and
every change is recorded.

The run's resolved config is saved as ``<run>/config.yaml`` when it starts; on resume the new
config is compared with it key by key (both redacted the same way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# keys that change what is logged, kept or evaluated, but not the training trajectory
NEUTRAL = ("run.resume", "run.overwrite", "run.allow_changes", "run.name", "log.", "checkpoint.", "eval.", "train.threads", "train.dist_timeout", "train.sharding")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): list(tree) if isinstance(tree, tuple) else tree}


def trajectory_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key that differs and alters the trajectory."""
    before, after = flatten(saved), flatten(current)
    changes = []
    for key in sorted(set(before) | set(after)):
        if key.startswith(NEUTRAL) or before.get(key) == after.get(key):
            continue
        changes.append((key, before.get(key), after.get(key)))
    return changes


def read_saved_config(run_dir: Path) -> dict | None:
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    shown = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes[:5])
    return shown + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")


def record(run_dir: Path, step: int, changes: list[tuple[str, Any, Any]]) -> None:
    """Append the allowed changes to ``<run>/resume_changes.jsonl``."""
    row = {"resumed_at_step": step, "changes": {key: {"from": old, "to": new} for key, old, new in changes}}
    with open(run_dir / "resume_changes.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
