"""A run's metrics: ``metrics.jsonl`` (one row per training step or evaluation), and the trackers ``log.report_to``
names (``training.trackers``)."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends rows to ``<run>/metrics.jsonl`` (and the trackers). Resuming keeps the rows up to the checkpoint's step
    (except the final evaluation at ``final_step``, which the resumed run writes again)."""

    def __init__(self, run_dir: Path, trackers, keep_until_step: int | None, final_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        rows = read_metrics(self.path) if keep_until_step is not None else []
        # rows after the checkpoint are replayed, and so is the final evaluation (never written twice)
        replayed = lambda r: r["step"] > keep_until_step or (r["kind"] == "eval" and r["step"] == final_step)  # noqa: E731
        kept = [r for r in rows if not replayed(r)] if keep_until_step is not None else []
        self.path.write_text("".join(json_row(r) + "\n" for r in kept))
        # ``trackers``: a function of TensorBoard's purge step giving the opened trackers (``training.trackers``)
        self.trackers = trackers((keep_until_step or 0) + 1)

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        try:
            with self.path.open("a") as handle:
                handle.write(json_row({"kind": kind, "step": step, **values}) + "\n")
        except OSError as err:  # a row torn by a full disk is dropped on resume (read_metrics)
            from .checkpoints import CheckpointError, write_failure

            raise CheckpointError(f"cannot append to {self.path}: {write_failure(err)}; the checkpoints written so far are intact (free space, then --resume)") from None
        for tracker in self.trackers:
            tracker.log(kind, step, values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


class NoMetrics:
    """What ranks other than 0 of a several-process run log to: nothing (rank 0 writes the run's one copy)."""

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def json_row(row: dict) -> str:
    """The row as strict JSON: a NaN or ±inf value becomes null, and ``nonfinite`` lists the keys it happened to."""
    nonfinite = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
        row = {**{k: (None if k in nonfinite else v) for k, v in row.items()}, "nonfinite": nonfinite}
    return json.dumps(row, allow_nan=False)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn last line (a run killed mid-write) is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break  # the write the run was killed in
            raise ValueError(f"{path}:{i + 1}: not a JSON row") from None
    return rows
