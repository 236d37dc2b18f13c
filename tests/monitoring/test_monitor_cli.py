"""`opensig predict --log` and `opensig monitor` end to end on real images and a real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from opensig.cli import app
from opensig.model import model_digest
from opensig.monitoring.log import read_log
from tests.conftest import write_params


@pytest.fixture
def logged(tmp_path: Path, digits_data: Path, untrained_bundle: Path, monkeypatch) -> Path:
    """A project whose log holds two predict runs of the untrained bundle on digits."""
    monkeypatch.chdir(tmp_path)
    write_params(
        tmp_path,
        {
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "monitor": {"min_rows": 20, "reference_size": 40, "window": 40},
        },
    )
    images = sorted((digits_data / "known" / "0").iterdir())[:40]
    for part in (images[:40], [*images[:39], tmp_path / "missing.png"]):
        batch = tmp_path / f"batch{len(list(tmp_path.glob('batch*')))}"
        batch.mkdir()
        for image in part:
            if image.exists():
                shutil.copy(image, batch / image.name)
        args = [
            "predict",
            str(batch),
            "--model",
            str(untrained_bundle),
            "--log",
            "logs/predictions",
        ]
        result = CliRunner().invoke(app, [*args, "--out", str(batch / "p.csv")])
        assert result.exit_code == 0, result.output
    return tmp_path


def test_predict_logs_rows_with_the_model_identity(logged: Path, untrained_bundle: Path) -> None:
    frame = read_log(str(logged / "logs" / "predictions"))
    assert len(frame) == 79
    assert set(frame["model"]) == {str(untrained_bundle)}
    assert set(frame["model_version"]) == {model_digest(untrained_bundle)}
    assert frame["sha256"].str.len().eq(64).all()
    assert [c for c in frame.columns if c.startswith("score_")] == ["score_0", "score_1", "score_2"]


def test_monitor_writes_report_pictures_and_mlflow_metrics(logged: Path) -> None:
    result = CliRunner().invoke(app, ["monitor", "--fail-on-alert"])
    assert result.exit_code == 0, result.output
    report = json.loads((logged / "reports" / "monitor.json").read_text())
    assert report["status"] == "ok"
    assert report["window"]["n"] == 39 and report["reference"]["n"] == 40
    rate = report["unknown_rate"]
    shares = []  # the current window is the second predict run, the reference the first
    for batch in ("batch1", "batch0"):
        labels = pd.read_csv(logged / batch / "p.csv", dtype={"label": str})["label"]
        shares.append(float((labels == "unknown").mean()))
    assert [rate["current"], rate["reference"]] == pytest.approx(shares)
    assert rate["ci_low"] <= rate["current"] <= rate["ci_high"] and 0 <= rate["p_value"] <= 1
    assert set(report["score_shift"]) == {"ks", "p_value", "psi"}
    assert sorted(p.name for p in (logged / "reports" / "monitor").iterdir()) == [
        "class_shares.png",
        "max_score.png",
        "unknown_rate.png",
    ]
    client = mlflow.MlflowClient(f"sqlite:///{logged / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("opensig-monitor").experiment_id])
    (point,) = client.get_metric_history(run.info.run_id, "unknown_rate")
    assert point.value == report["unknown_rate"]["current"]


def test_monitor_too_few_rows_and_bad_logs(logged: Path, caplog) -> None:
    result = CliRunner().invoke(app, ["monitor", "--model-version", "nope"])
    assert result.exit_code == 2
    assert "no rows of model version 'nope'" in caplog.text
    write_params(logged, {"monitor": {"min_rows": 100}})
    result = CliRunner().invoke(app, ["monitor", "--out", "m.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((logged / "m.json").read_text())["status"] == "too_few_rows"
    result = CliRunner().invoke(app, ["monitor", "--log", "nowhere"])
    assert result.exit_code == 2
    assert "nowhere: no prediction log there" in caplog.text
