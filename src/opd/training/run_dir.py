"""Claiming a run directory: what a start, a resume or an overwrite does with what ``run.output_dir`` already holds.

A directory that holds a run is refused unless ``run.resume`` (continue from its newest intact checkpoint,
after the resume checks) or ``run.overwrite`` (start again); a ``final/`` left half swapped by a killed run is
put back first. One run at a time holds the directory (``run_lock``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .checkpoints import latest_checkpoint
from .final_model import recover_final_model
from .resume import RunDirError, check_resume

log = logging.getLogger(__name__)


def prepare_run_dir(cfg) -> tuple[Path, Path | None, list]:
    """``(run directory, the checkpoint to resume from or None, the settings that resume changes)``, the directory
    made ready for this run."""
    run_dir = Path(cfg.run.output_dir)
    recover_final_model(run_dir / "final")
    resume_from = latest_checkpoint(run_dir) if cfg.run.resume else None
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if cfg.run.resume and resume_from is None:
        if holds_run and not cfg.run.overwrite:  # starting again would truncate its metrics
            c = cfg.checkpoint
            why = ("this config saves none (checkpoint.every=0, checkpoint.at_end=false)" if not c.every and not c.at_end
                   else f"the run stopped before its first checkpoint (checkpoint.every={c.every}{', and at its end' if c.at_end else ''})")
            raise RunDirError(
                f"run.resume=true but run.output_dir '{run_dir}' holds no intact checkpoint to resume from: {why}; "
                "pass run.overwrite=true to start it again from step 0"
            )
        log.warning("run.resume=true but %s holds no checkpoint; starting from step 0", run_dir)
    changes = check_resume(cfg, run_dir, resume_from) if resume_from is not None else []
    if holds_run and resume_from is None and not cfg.run.resume:
        if not cfg.run.overwrite:
            raise RunDirError(
                f"run.output_dir '{run_dir}' already holds a run; pass run.resume=true to continue it "
                "or run.overwrite=true to replace it"
            )
        for name in ("checkpoints", "tensorboard", "final"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, resume_from, changes
