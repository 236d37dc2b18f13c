"""The real stages, end to end, on the digits demo with a real SQLite MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from opensig.cli import app
from tests.conftest import METRIC_KEYS, write_params

STAGES = ["ingest", "train", "tune", "evaluate", "register"]

pytestmark = pytest.mark.e2e


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"opensig {' '.join(args)} failed:\n{result.output}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    """Run every stage once in a fresh project folder; tests then inspect its outputs."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(digits_data, root / "data")
    write_params(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in STAGES:
            run_cli(stage)
    return root


@pytest.fixture
def in_pipeline(pipeline: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(pipeline)
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    return pipeline


def test_metrics_are_complete_and_far_above_chance(in_pipeline: Path) -> None:
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["known_accuracy"] > 0.85  # chance is 1/6 for the six known digits
    assert metrics["auroc"] > 0.75
    assert metrics["macro_f1"] > 0.5
    novel = metrics["novel"]
    assert set(novel) >= {"auroc", "fpr95", "oscr", "unknown_recall"}
    assert novel["n_novel"] > 300  # digits 8 and 9, test only
    assert novel["auroc"] > 0.6


def test_outputs_and_manifest(in_pipeline: Path) -> None:
    manifest = pd.read_parquet("artifacts/manifest.parquet")
    assert len(manifest) == 1797
    assert set(manifest[manifest["novel"]]["split"]) == {"test"}
    assert set(manifest[manifest["novel"]]["source"]) == {"8", "9"}
    for path in [
        "artifacts/model/weights.safetensors",
        "artifacts/model/config.json",
        "artifacts/checkpoints/last/weights.safetensors",
        "reports/train.json",
        "reports/plots/confusion.csv",
        "reports/plots/roc.csv",
        "reports/plots/confusion.png",
        "reports/train/train_history.csv",
    ]:
        assert Path(path).is_file(), path
    confusion = pd.read_csv("reports/plots/confusion.csv")
    assert "unknown" in set(confusion["actual"])
    thresholds = json.loads(Path("artifacts/thresholds.json").read_text())
    assert thresholds["strategy"] == "f1"
    assert sorted(thresholds["thresholds"]) == ["0", "1", "2", "3", "4", "5"]


def test_registered_as_champion_with_provenance(in_pipeline: Path) -> None:
    registered = json.loads(Path("reports/registered.json").read_text())
    assert registered["version"] == "1"
    assert set(registered["aliases"]) == {"champion", "challenger"}
    client = MlflowClient()
    run = client.get_run(registered["run_id"])
    assert run.data.params["train.method"] == "sigmoid_bce"
    assert run.data.metrics["macro_f1"] == pytest.approx(
        json.loads(Path("reports/metrics.json").read_text())["macro_f1"]
    )
    assert "novel.auroc" in run.data.metrics
    assert "opensig_version" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(registered["run_id"], "reports")}
    assert "reports/confusion.png" in artifacts and "reports/roc.png" in artifacts


def test_predict_by_alias_with_a_bad_file(in_pipeline: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    manifest = pd.read_parquet("artifacts/manifest.parquet")
    test_known = manifest[(manifest["split"] == "test") & (manifest["label"] != "unknown")]
    for path in test_known["path"].head(20):
        shutil.copy(path, photos / Path(path).name)
    (photos / "broken.png").write_text("not an image")
    out = tmp_path / "preds.csv"
    run_cli("predict", "--model", "models:/opensig@champion", str(photos), "--out", str(out))
    preds = pd.read_csv(out, dtype={"label": str})
    assert len(preds) == 21
    broken = preds[preds["path"].str.endswith("broken.png")]
    assert broken["error"].str.contains("cannot identify").all()
    good = preds[preds["error"].isna()]
    truth = {
        Path(p).name: label
        for p, label in zip(test_known["path"], test_known["label"], strict=True)
    }
    correct = sum(
        truth[Path(p).name] == label for p, label in zip(good["path"], good["label"], strict=True)
    )
    assert correct >= 14
    assert {f"score_{c}" for c in "012345"} <= set(preds.columns)

    jsonl = tmp_path / "preds.jsonl"
    run_cli(
        "predict",
        "--model",
        "artifacts/model",
        "--thresholds",
        "artifacts/thresholds.json",
        str(photos),
        "--out",
        str(jsonl),
    )
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["label"] for r in rows] == [None if pd.isna(x) else x for x in preds["label"]]


def test_pyfunc_model_answers_from_paths_and_bytes(in_pipeline: Path) -> None:
    model = mlflow.pyfunc.load_model("models:/opensig@champion")
    image = next(Path("data/known/3").iterdir())
    by_path = model.predict(pd.DataFrame({"path": [str(image)]}))
    by_bytes = model.predict(pd.DataFrame({"image": [image.read_bytes()]}))
    assert by_path["label"].iloc[0] == by_bytes["label"].iloc[0]
    assert by_path["score_3"].iloc[0] == pytest.approx(by_bytes["score_3"].iloc[0])


def test_second_registration_keeps_champion_unless_better(in_pipeline: Path) -> None:
    write_params(in_pipeline, {"promote": {"min_delta": 0.5}})
    run_cli("register")  # the same bundle again: reused, not registered twice
    assert json.loads(Path("reports/registered.json").read_text())["version"] == "1"
    thresholds = Path("artifacts/thresholds.json")
    thresholds.write_text(thresholds.read_text() + "\n")  # same model, new bytes: a new bundle
    run_cli("register")
    registered = json.loads(Path("reports/registered.json").read_text())
    assert registered["version"] == "2"
    assert registered["aliases"] == ["challenger"]
    assert registered["promoted"] is False
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("opensig", "champion").version) == "1"
    tags = client.get_model_version("opensig", "2").tags
    assert tags["promote.decision"] == "kept champion"
    assert tags["promote.champion_version"] == "1"
    # Same model, same test split: the champion re-measured gives the challenger's value.
    assert float(tags["promote.champion_value"]) == pytest.approx(
        float(tags["promote.challenger_value"])
    )
