"""`opensig predict --engine spark` on a real local Spark (local[2]): the registered model,
scored by MLflow's spark_udf on the executors, answers exactly as `opensig predict` does,
row for row, broken files included; its log rows are read by `opensig monitor`; bad input
gets predict's one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from opensig.cli import app
from opensig.decision import THRESHOLDS_FILE
from opensig.monitoring.log import read_log
from tests.conftest import register_bundle, write_params
from tests.reliability import messy

pytest.importorskip("pyspark", reason="pip install 'opensig[spark]'")
if shutil.which("java") is None:
    pytest.skip(
        "Spark needs Java (apt-get install openjdk-17-jre-headless)", allow_module_level=True
    )

MODEL = "digits"
PER_CLASS = 60  # of each digit, 0-9: 600 images


@pytest.fixture(scope="module")
def lake(
    untrained_bundle: Path, digits_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """A registered model and a folder of digit PNGs with broken files among them."""
    root = tmp_path_factory.mktemp("spark")
    uri = register_bundle(untrained_bundle, untrained_bundle / THRESHOLDS_FILE, root, MODEL)
    images = root / "lake"
    for folder in sorted(p for p in digits_data.glob("*/*") if p.is_dir()):
        for path in sorted(folder.iterdir())[:PER_CLASS]:
            target = images / folder.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    messy.write(images / "broken" / "empty.png", b"")
    messy.write(images / "broken" / "notes.txt", b"not an image at all\n")
    messy.truncated_jpeg(images / "broken" / "cut.jpg")
    messy.png_bomb(images / "broken" / "bomb.png")
    messy.save(images / "odd name" / "a+b c.png", messy.Image.fromarray(messy.noise(1)), "PNG")
    return {"uri": uri, "images": images, "root": root}


def run(*args: str) -> object:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_spark_answers_as_predict_does_and_logs_for_the_monitor(
    lake: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model, images = f"models:/{MODEL}@champion", str(lake["images"])
    common = ["--model", model, "--tracking-uri", lake["uri"]]
    local = run("predict", images, *common, "--out", "local.csv")
    assert local.exit_code == 0, local.output
    spark = run(
        "predict", images, *common, "--engine", "spark", "--spark-master", "local[2]",
        "--out", "spark.parquet", "--log", "log",
    )  # fmt: skip
    assert spark.exit_code == 0, spark.output

    text = {"path": str, "label": str, "error": str}
    expected = pd.read_csv("local.csv", dtype=text, keep_default_na=False, na_values=[""])
    got = pd.read_parquet("spark.parquet")
    assert list(got.columns) == list(expected.columns)  # predict's columns, in its order
    assert len(got) == len(expected) == 10 * PER_CLASS + 5
    expected = expected.sort_values("path").reset_index(drop=True)
    got = got.sort_values("path").reset_index(drop=True)
    assert got["path"].tolist() == expected["path"].tolist()  # real paths, not file: URIs
    assert got["error"].fillna("").tolist() == expected["error"].fillna("").tolist()
    assert (
        got["label"].tolist() == expected["label"].where(expected["label"].notna(), None).tolist()
    )
    scores = [c for c in expected.columns if c.startswith("score")]
    pd.testing.assert_frame_equal(got[scores], expected[scores], atol=1e-5, rtol=0)
    broken = got[got["path"].str.contains("/broken/")]
    assert len(broken) == 4 and (broken["error"] != "").all() and broken["label"].isna().all()

    logged = read_log("log")
    assert len(logged) == len(got)
    assert set(logged["model_version"]) == {"1"} and set(logged["model"]) == {MODEL}
    assert logged["sha256"].notna().sum() == len(got)  # every file was read by Spark
    assert sorted(logged["path"]) == sorted(got["path"])
    assert (logged["error"].fillna("") != "").sum() == (got["error"].fillna("") != "").sum() == 4
    window = {"log_dir": "log", "reference_size": 300, "window": 300, "min_rows": 100}
    write_params(tmp_path, {"monitor": window})
    monitor = run("monitor")
    assert monitor.exit_code == 0, monitor.output
    report = json.loads(Path("reports/monitor.json").read_text())
    assert (report["model"], report["model_version"]) == (MODEL, "1")
    assert report["reference"]["n"] == report["window"]["n"] == 300  # the batch job's rows
    assert "error_rate" in report and "unknown_rate" in report


def test_spark_gives_predicts_errors(
    lake: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = lake["images"]
    missing = str(tmp_path / "nowhere")
    spark = ["--engine", "spark", "--spark-master", "local[1]", "--tracking-uri", lake["uri"]]
    out = str(tmp_path / "partly.parquet")
    partly = run("predict", str(images / "broken"), missing, "--model", f"models:/{MODEL}/1",
                 *spark, "--out", out)  # fmt: skip
    assert partly.exit_code == 1  # an input does not exist: not a success, the rest written
    rows = pd.read_parquet(out).set_index("path")
    assert len(rows) == 5 and rows.loc[missing, "error"].startswith("FileNotFoundError")
    assert "1 input(s) do not exist" in caplog.text

    bad = run("predict", str(images), "--model", f"models:/{MODEL}@nope", *spark,
              "--out", str(tmp_path / "bad.parquet"))  # fmt: skip
    assert bad.exit_code == 2
    assert f"model '{MODEL}' has no alias @nope" in caplog.text
    folder = run("predict", str(images), "--model", str(lake["root"]), *spark,
                 "--out", str(tmp_path / "f.parquet"))  # fmt: skip
    assert folder.exit_code == 2 and "scores an MLflow model" in caplog.text
    csv = run("predict", str(images), "--model", "x", *spark, "--out", "p.csv")
    assert csv.exit_code == 2 and "writes a Parquet dataset" in csv.output


def test_the_batch_score_flow_scores_logs_monitors_and_reports(
    lake: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """opensig-batch-score on the project's params: the champion scores score.inputs on Spark
    into a Parquet folder and the log, the monitor reads it, the artifact says so."""
    from prefect.artifacts import Artifact
    from prefect.testing.utilities import prefect_test_harness

    from opensig.score_flow import ARTIFACT_KEY, batch_score

    monkeypatch.chdir(tmp_path)
    write_params(
        tmp_path,
        {
            "mlflow": {"tracking_uri": lake["uri"], "registered_model": MODEL},
            "monitor": {"log_dir": "logs", "reference_size": 10, "window": 10, "min_rows": 5},
            "score": {"inputs": [str(lake["images"] / "0")], "spark_master": "local[2]"},
        },
    )
    with prefect_test_harness():
        summary = batch_score(str(tmp_path))
        artifact = Artifact.get(ARTIFACT_KEY)
    assert summary["written"] == PER_CLASS and summary["missing"] == []
    rows = pd.read_parquet(summary["out"])
    assert len(rows) == PER_CLASS and Path(summary["out"]).parent == tmp_path / "predictions/batch"
    assert len(read_log("logs")) == PER_CLASS
    assert summary["status"] == json.loads(Path("reports/monitor.json").read_text())["status"]
    assert f"{PER_CLASS} images scored" in artifact.data
    assert f"monitor, model version 1: {summary['status']}" in artifact.data


def test_the_jvm_path_expression_agrees_with_local_path(lake: dict) -> None:
    from opensig.spark import local_path, local_path_column, session

    paths = ["file:/d/a%20b.png", "file:///d/a+b%2Bc.png", "s3a://b/k%20x.jpg", "file:/d/%25.png"]
    frame = session().createDataFrame([(p,) for p in paths], "path string")
    got = [
        row.path for row in frame.select(local_path_column(frame["path"]).alias("path")).collect()
    ]
    assert (
        got
        == [local_path(p) for p in paths]
        == ["/d/a b.png", "/d/a+b+c.png", "s3a://b/k%20x.jpg", "/d/%.png"]
    )
