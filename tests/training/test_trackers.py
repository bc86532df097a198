"""log.report_to: metrics reach Weights & Biases (offline mode) and MLflow (a local file store) through the real
libraries, the run's resolved config with its secrets redacted as their run config; no network."""

from __future__ import annotations

import json

import pytest
from conftest import make_config

from opd.config.sections import ConfigError
from opd.training.loop import train

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def test_wandb_offline_and_mlflow_get_the_metrics_and_the_redacted_config(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    secret_url = "https://bob:hunter2@judge.example.com/v1"
    common = ["log.report_to=[wandb, mlflow, tensorboard]", f"method.ovd.http.url={secret_url}", "checkpoint.at_end=true"]  # a
    train(make_config(tmp_path, tiny_models, *common, "train.steps=2"))  # secret in the config, in a section this run does not use
    run = tmp_path / "run"
    first_ids = (run / "wandb_run_id").read_text(), (run / "mlflow_run_id").read_text()
    train(make_config(tmp_path, tiny_models, *common, "train.steps=3", "run.resume=true", "run.allow_changes=true"))  # one more step: the same runs go on
    assert ((run / "wandb_run_id").read_text(), (run / "mlflow_run_id").read_text()) == first_ids
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    run_id = (run / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3] and [m.value for m in history] == pytest.approx(losses)
    params = client.get_run(run_id).data.params  # logged once, when the run began (MLflow parameters cannot change)
    assert params["train.steps"] == "2" and params["method.ovd.http.url"] == "https://<redacted>@judge.example.com/v1"

    # the offline run's record file (protobuf records; its strings, the metric values' JSON among them, are stored as
    # they are): every step's loss, the config's redacted URL and never the password
    wandb_id = (run / "wandb_run_id").read_text().strip()
    records = sorted((run / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(records) == 2 == len(list((run / "wandb").glob("offline-run-*")))  # the run, then its resume, one id
    data = b"".join(r.read_bytes() for r in records)
    assert b"train/loss" in data and all(json.dumps(loss).encode() in data for loss in losses)
    assert b"https://<redacted>@judge.example.com/v1" in data and b"hunter2" not in data
    assert list((run / "tensorboard").glob("events.*"))


def test_an_unknown_tracker_is_one_line_naming_the_key(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match=r"^config key 'log\.report_to' names 'comet'; the trackers are tensorboard, wandb, mlflow$"):
        make_config(tmp_path, tiny_models, "log.report_to=[comet]")
