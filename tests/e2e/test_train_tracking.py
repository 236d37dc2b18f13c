"""Training logs its epochs to MLflow, and never depends on it: a dead tracking server is a
warning, and a stopped training resumes logging into the run it started."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from opensig.config import load_config
from opensig.stages import HERE, evaluate, ingest, register, train, tune
from tests.conftest import free_port, write_params
from tests.reliability.test_resume import stop_in_epoch_2

pytestmark = pytest.mark.e2e


def test_training_goes_on_when_the_tracking_server_is_down(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    write_params(project, {"train": {"epochs": 1}, "mlflow": {"tracking_uri": dead, "retries": 0}})
    ingest(load_config())
    caplog.set_level(logging.INFO, logger="opensig")
    start = time.monotonic()
    train(load_config())
    assert time.monotonic() - start < 300
    assert (HERE.model_dir / "weights.safetensors").is_file()
    assert json.loads(HERE.train_report.read_text())["mlflow_run_id"] is None
    [warning] = [
        r.message
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "opensig.tracking.runs"
    ]
    assert "cannot reach the MLflow tracking store" in warning
    assert "training goes on without MLflow logging" in warning

    # Once the store is back, register logs a run of its own, as it would without training's.
    store = f"sqlite:///{project / 'mlflow.db'}"
    write_params(project, {"train": {"epochs": 1}, "mlflow": {"tracking_uri": store}})
    cfg = load_config()
    tune(cfg)
    evaluate(cfg)
    registered = register(cfg)
    client = MlflowClient(store)
    evaluated = json.loads(HERE.metrics.read_text())["macro_f1"]
    assert client.get_run(registered["run_id"]).data.metrics["macro_f1"] == pytest.approx(evaluated)
    assert client.get_metric_history(registered["run_id"], "train_loss") == []


def test_stopped_training_resumes_logging_into_its_run(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"sqlite:///{project / 'mlflow.db'}"
    write_params(project, {"train": {"epochs": 2}, "mlflow": {"tracking_uri": store}})
    cfg = load_config()
    ingest(cfg)
    stop_in_epoch_2(cfg, monkeypatch)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    [stopped] = client.search_runs([experiment])
    assert stopped.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, "val_loss")] == [1]

    train(cfg)
    run_id = json.loads(HERE.train_report.read_text())["mlflow_run_id"]
    assert run_id == stopped.info.run_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]
    for key in ("train_loss", "val_loss"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [1, 2], key
    assert client.get_run(run_id).info.status == "FINISHED"
