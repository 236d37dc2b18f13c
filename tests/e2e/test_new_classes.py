"""A user's own classes after the demo: register judges the demo champion on the new data,
registers nothing before the gate has passed, and keeps logging into the training's run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient

from tests.conftest import write_params
from tests.e2e.test_pipeline import STAGES, run_cli
from tests.reliability.test_register_faults import run_stage

pytestmark = pytest.mark.e2e

NEW_CLASSES = {"zero": "0", "one": "1", "two": "2"}  # the user's classes, from digit folders


def own_data(digits: Path, into: Path) -> None:
    """Three classes the demo model never knew, with the demo's unknown sources."""
    shutil.rmtree(into)
    for name, digit in NEW_CLASSES.items():
        shutil.copytree(digits / "known" / digit, into / "known" / name)
    shutil.copytree(digits / "unknown", into / "unknown")


def aliases(client: MlflowClient) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model("opensig").aliases.items()}


def test_own_classes_after_the_demo(
    tmp_path: Path,
    digits_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shutil.copytree(digits_data, tmp_path / "data")
    write_params(tmp_path, {"train": {"epochs": 2}})
    monkeypatch.chdir(tmp_path)
    # An absolute URI: MLflow caches its store per URI, and a relative one would reach the
    # store of the first test (in its own folder) that used it in this process.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for stage in STAGES:
        run_cli(stage)
    client = MlflowClient()
    assert aliases(client) == {"champion": "1", "challenger": "1"}

    own_data(digits_data, tmp_path / "data")
    for stage in STAGES[:-1]:
        run_cli(stage)

    # A champion that cannot be judged (its files gone) stops register before anything is
    # registered or re-aliased.
    champion_files = Path(urlparse(client.get_model_version_download_uri("opensig", "1")).path)
    hidden = tmp_path / "hidden-champion"
    champion_files.rename(hidden)
    Path("reports/registered.json").unlink()  # dvc repro removes a stage's outputs first
    result = run_stage("register")
    assert result.exit_code == 2, result.output
    assert [str(v.version) for v in client.search_model_versions("name = 'opensig'")] == ["1"]
    assert "the champion, version 1, could not be judged" in caplog.text
    assert aliases(client) == {"champion": "1", "challenger": "1"}
    assert not Path("reports/registered.json").exists()
    hidden.rename(champion_files)

    # Judged on today's classes, the demo champion names none of them: the new model wins.
    run_cli("register")
    registered = json.loads(Path("reports/registered.json").read_text())
    assert registered["version"] == "2"
    assert registered["aliases"] == ["challenger", "champion"]
    comparison = registered["comparison"]
    assert comparison["decision"] == "promoted"
    assert comparison["class_sets"] == "differ"
    assert comparison["champion_lacks"] == ["one", "two", "zero"]
    assert comparison["champion_extra"] == ["0", "1", "2", "3", "4", "5"]
    assert comparison["champion_value"] < 0.5 < comparison["challenger_value"]
    tags = client.get_model_version("opensig", "2").tags
    assert tags["promote.class_sets"] == "differ"
    assert tags["promote.champion_lacks"] == "one, two, zero"
    # One MLflow run holds the new training and its registration.
    assert (
        registered["run_id"] == json.loads(Path("reports/train.json").read_text())["mlflow_run_id"]
    )

    # A new registered model name (settings that are not params) keeps the training's run.
    write_params(tmp_path, {"train": {"epochs": 2}, "mlflow": {"registered_model": "shapes"}})
    run_cli("register")
    renamed = json.loads(Path("reports/registered.json").read_text())
    assert (renamed["name"], renamed["version"]) == ("shapes", "1")
    assert renamed["run_id"] == registered["run_id"]
