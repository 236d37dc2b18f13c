"""Progress output a person reads: bars count images, and libraries' own bars stay quiet."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from opensig.predict import resolve_model_dir

PROGRESS_SWITCH = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@pytest.fixture
def logged_model(tmp_path: Path, untrained_bundle: Path) -> tuple[str, str]:
    """A real run in a SQLite store with a bundle logged as an MLflow model's artifacts."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    try:
        mlflow.set_experiment(experiment_name="downloads")
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(untrained_bundle), "model/artifacts/bundle")
    finally:
        mlflow.set_tracking_uri(None)
    return f"runs:/{run.info.run_id}/model", store


def test_model_download_shows_no_mlflow_bar(
    logged_model: tuple[str, str], capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's 'Downloading artifacts' bar is drawn even into logs (register ran it inside
    Prefect: five lines of bar per download)."""
    monkeypatch.delenv(PROGRESS_SWITCH, raising=False)
    uri, store = logged_model
    folder = resolve_model_dir(uri, store)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "thresholds.json",
        "weights.safetensors",
    ]
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert PROGRESS_SWITCH not in os.environ  # the process's environment is given back
