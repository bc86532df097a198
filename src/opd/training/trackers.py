"""Where a run's metrics go besides ``metrics.jsonl``: ``log.report_to`` names the trackers, each through its own
library (TensorBoard, Weights & Biases, MLflow; the last two optional: ``pip install 'opd[trackers]'``).

Every tracker gets the run's resolved config as the run's config (credentials redacted, as in ``config.yaml``)
and each row's numeric values as ``<kind>/<key>`` at the row's step. Where they write is each library's own
setting: ``WANDB_MODE`` / ``WANDB_PROJECT`` (``offline`` keeps the run in ``<run>/wandb``),
``MLFLOW_TRACKING_URI`` (default: a file store in ``<run>/mlruns``).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Protocol

class Tracker(Protocol):
    def log(self, kind: str, step: int, values: dict) -> None: ...

    def close(self) -> None: ...


def numeric(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"train.lr": "0.0001", ...}`` (MLflow's parameters)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, kind: str, step: int, values: dict) -> None:
        for key, value in numeric(values).items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run per opd run; its id is kept in ``<run>/wandb_run_id``, so a resumed run continues it."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opd"), name=name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config)

    def log(self, kind: str, step: int, values: dict) -> None:
        self.run.log({f"{kind}/{k}": v for k, v in numeric(values).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


MLFLOW_KEY = re.compile(r"[^\w\-. /]")  # what MLflow allows in a metric name


class MlflowTracker:
    """An MLflow run per opd run (experiment ``run.name``); its id is kept in ``<run>/mlflow_run_id`` for a resume."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # a file store beside the run (MLflow keeps it in maintenance mode; opd opts in for it)
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(name)
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():
            self.run = mlflow.start_run(run_id=id_file.read_text().strip())
        else:
            self.run = mlflow.start_run(run_name=name, experiment_id=experiment.experiment_id)
            id_file.write_text(self.run.info.run_id)
            mlflow.log_params(flat(config))

    def log(self, kind: str, step: int, values: dict) -> None:
        metrics = {MLFLOW_KEY.sub("_", f"{kind}/{k}"): v for k, v in numeric(values).items()}
        if metrics:
            self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def open_trackers(names: list[str], run_dir: Path, run_name: str, config: dict, purge_step: int) -> list[Tracker]:
    """The trackers ``names`` lists, opened for ``run_dir`` (``purge_step``: TensorBoard drops rows from there on)."""
    makers = {
        "tensorboard": lambda: TensorBoardTracker(run_dir, purge_step),
        "wandb": lambda: WandbTracker(run_dir, run_name, config),
        "mlflow": lambda: MlflowTracker(run_dir, run_name, config),
    }
    return [makers[name]() for name in names]
