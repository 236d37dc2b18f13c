"""Progress output a person reads: bars count images, and libraries' own bars stay quiet."""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

import mlflow
import pytest

from opensig.config import load_config
from opensig.decision import THRESHOLDS_FILE
from opensig.progress import image_bar
from opensig.tracking.model_uri import resolve_model_dir
from opensig.tracking.promotion import ModelRegistry, log_and_register
from opensig.tracking.runs import RunSpec
from opensig.tracking.store import connected
from tests.conftest import write_params

PROGRESS_SWITCH = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class Terminal(io.StringIO):
    """stderr as a terminal, so that tqdm draws its bars (it skips non-terminals)."""

    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """Patched in the test itself: pytest puts its own stderr back after fixtures ran."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    return screen


def test_image_bar_counts_images_from_where_a_resumed_run_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = on_terminal(monkeypatch)
    with image_bar(300, "training", initial=100) as bar:
        bar.update(64)
    drawn = terminal.getvalue()
    assert "training:  33%" in drawn and "| 100/300 [" in drawn and "img/s" in drawn


def test_image_bar_puts_log_lines_above_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = on_terminal(monkeypatch)
    console = logging.StreamHandler(sys.stderr)  # the CLI's handler, on the terminal
    monkeypatch.setattr(logging.root, "handlers", [console])
    with image_bar(10, "scoring") as bar:
        bar.update(5)
        logging.getLogger("opensig.test").warning("halfway")
    drawn = terminal.getvalue()
    assert "]halfway" not in drawn and "\rhalfway\n" in drawn  # the bar is cleared first
    assert logging.root.handlers == [console]


def test_hidden_image_bar_draws_nothing_even_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = on_terminal(monkeypatch)
    with image_bar(10, "scoring", show=False) as bar:
        bar.update(10)
    assert terminal.getvalue() == ""


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
        "feature_score.safetensors",  # empty: these thresholds use no feature score
        "thresholds.json",
        "weights.safetensors",
    ]
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert PROGRESS_SWITCH not in os.environ  # the process's environment is given back


def test_registering_a_model_shows_no_mlflow_bar(
    tmp_path: Path,
    untrained_bundle: Path,
    capfd: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """log_model copies the bundle into the model through MLflow's download code: the
    register stage drew the same bar there, champion or not."""
    monkeypatch.delenv(PROGRESS_SWITCH, raising=False)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    cfg = load_config()
    with connected(cfg.mlflow) as uri:
        registry = ModelRegistry(uri, cfg.mlflow.registered_model, cfg.mlflow.experiment)
        _, version = log_and_register(
            registry,
            RunSpec.of(cfg),
            {"macro_f1": 0.5},
            untrained_bundle,
            untrained_bundle / THRESHOLDS_FILE,
            [],
        )
    assert version == "1"
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert PROGRESS_SWITCH not in os.environ
