"""The opensig-monitor flow on a real prediction log: ok without drift; on a jump of the
unknown rate, a review batch, the Markdown artifact and (without a Prefect API) no event."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from opensig.cli import app
from opensig.monitor_flow import ARTIFACT_KEY, monitor, summary_markdown
from opensig.monitoring.log import PredictionLog
from opensig.monitoring.monitor import MONITOR_EXPERIMENT, VERSION_TAG
from tests.conftest import write_params


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness():
        yield


def predictions(paths: list[Path], unknown_every: int) -> pd.DataFrame:
    """Bundle.predict's frame for ``paths``: every ``unknown_every``-th image unknown."""
    unknown = [i % unknown_every == 0 for i in range(len(paths))]
    return pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "label": ["unknown" if u else "0" for u in unknown],
            "score": [0.2 if u else 0.9 for u in unknown],
            "score_0": [0.2 if u else 0.9 for u in unknown],
            "score_1": [0.1] * len(paths),
            "error": [""] * len(paths),
        }
    )


@pytest.fixture
def logged(tmp_path: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose log holds a reference window (5% unknown) and a current one (50%)."""
    monkeypatch.chdir(tmp_path)  # its MLflow store, sqlite:///mlflow.db, is the project's
    for part in ("known/1", "unknown"):
        shutil.copytree(digits_data / part, tmp_path / "data" / part)
    write_params(tmp_path, {"monitor": {"window": 120, "reference_size": 120, "min_rows": 50}})
    images = sorted((digits_data / "known" / "0").iterdir())[:120]  # outside the project's data
    log = PredictionLog(str(tmp_path / "logs/predictions"), "opensig", "1")
    log.append(predictions(images, 20), images)
    log.append(predictions(images, 2), images)
    return tmp_path


def test_an_alert_exports_a_review_batch_and_reports(
    logged: Path, digits_data: Path, harness: None
) -> None:
    result = monitor(str(logged))
    assert result["status"] == "alert"
    assert any("unknown rate" in alert for alert in result["alerts"])
    report = json.loads((logged / "reports/monitor.json").read_text())
    assert (report["status"], report["alerts"]) == (result["status"], result["alerts"])
    assert report["unknown_rate"]["current"] == pytest.approx(0.5)  # 60 of the 120
    assert report["unknown_rate"]["reference"] == pytest.approx(0.05)  # 6 of the 120
    batch = Path(result["batch"])
    assert batch.parent == logged / "review"
    images = sorted((digits_data / "known" / "0").iterdir())[:120]
    listing = pd.read_csv(batch / "review.csv", dtype=str, keep_default_na=False)
    assert sorted(listing["original_path"]) == sorted(map(str, images))  # each image once
    # the images the current window calls unknown, copied into the inbox to be looked at
    unknown = {p.name for p in (batch / "inbox" / "unknown").iterdir()}
    assert unknown == {image.name for image in images[::2]}
    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None and "version 1: alert" in artifact.data
    assert f"Review batch: `{batch}`" in artifact.data
    assert result["announced"]

    # the next scheduled run over the same window: the same alert, announced once
    again = monitor(str(logged))
    assert (again["status"], again["announced"], again["batch"]) == ("alert", False, None)
    assert [p.name for p in (logged / "review").iterdir()] == [batch.name]
    # MLflow draws one point per monitor run: step = its number, at the window's end
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{logged / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(MONITOR_EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "unknown_rate")
    assert [m.step for m in history] == [1, 2]
    end = pd.Timestamp(report["window"]["to"]).timestamp() * 1000
    assert {m.timestamp for m in history} == {int(end)}


def test_an_alert_on_a_multi_label_log_goes_out_without_a_batch(
    logged: Path, digits_data: Path, harness: None
) -> None:
    """Review cannot take label sets yet: the alert and the report, but no review batch."""
    images = sorted((digits_data / "known" / "0").iterdir())[:120]
    frame = predictions(images, 2)
    frame.insert(2, "labels", frame["label"])
    PredictionLog(str(logged / "logs/predictions"), "opensig", "1").append(frame, images)
    result = monitor(str(logged))
    assert result["status"] == "alert" and result["batch"] is None
    assert not (logged / "review").exists()
    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None and "version 1: alert" in artifact.data
    assert "Review batch" not in artifact.data


def monitored_versions(uri: str) -> list[str]:
    """The model versions the opensig-monitor runs of the store at ``uri`` watch."""
    from mlflow import MlflowClient

    experiment = MlflowClient(uri).get_experiment_by_name(MONITOR_EXPERIMENT)
    if experiment is None:
        return []
    runs = MlflowClient(uri).search_runs([experiment.experiment_id])
    return [run.data.tags[VERSION_TAG] for run in runs]


def test_the_store_of_params_is_read_from_the_project_not_from_here(
    logged: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    harness: None,
) -> None:
    """A relative sqlite:///mlflow.db in params is the project's, wherever the flow runs;
    --tracking-uri wins over params."""
    write_params(
        logged,
        {
            "mlflow": {"tracking_uri": "sqlite:///mlflow.db"},
            "monitor": {"window": 120, "reference_size": 120, "min_rows": 50},
        },
    )
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    assert monitor(str(logged))["status"] == "alert"
    assert monitored_versions(f"sqlite:///{logged / 'mlflow.db'}") == ["opensig:1"]
    assert not (elsewhere / "mlflow.db").exists()

    # a relative path given on the command line is relative to where it was typed
    args = ["monitor-flow", "--project", str(logged), "--tracking-uri", "sqlite:///other.db"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert monitored_versions(f"sqlite:///{elsewhere / 'other.db'}") == ["opensig:1"]


def test_summary_markdown_of_too_few_rows() -> None:
    report = {"model": "m", "model_version": "2", "status": "too_few_rows", "alerts": []}
    assert summary_markdown(report, None) == "# m version 2: too_few_rows\n\nNo alert."
