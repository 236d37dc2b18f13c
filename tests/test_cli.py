"""The command line: bad input fails fast with a message naming the key or path."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from opensig.cli import app
from opensig.labels import UNKNOWN, UNKNOWN_LABEL
from opensig.thresholds import decide
from tests.conftest import register_bundle, write_params


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_every_stage_is_a_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ["ingest", "train", "tune", "evaluate", "register", "predict", "retrain"]:
        assert command in result.output


def test_unknown_key_fails_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = write_params(tmp_path, {"train": {"epoch": 3}})
    result = invoke("train", "--params", str(params))
    assert result.exit_code == 2
    assert "train.epoch: unknown key" in caplog.text


def test_missing_data_folder_fails_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"data": {"root": "photos"}})
    result = invoke("ingest")
    assert result.exit_code == 2
    assert "photos" in caplog.text
    assert not Path("artifacts").exists()


def test_stage_before_its_input_exists_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    assert invoke("train").exit_code == 2
    assert "opensig ingest" in caplog.text


def test_predict_rejects_an_unknown_output_format(tmp_path: Path) -> None:
    result = invoke("predict", "--model", "x", str(tmp_path), "--out", str(tmp_path / "p.txt"))
    assert result.exit_code != 0
    assert ".csv or .jsonl" in result.output


def test_ingest_reports_skipped_files(project: Path) -> None:
    (project / "data/known/0/notes.txt").write_text("not an image")
    (project / "data/known/1/empty.png").write_bytes(b"")
    assert invoke("ingest").exit_code == 0
    report = json.loads(Path("reports/ingest.json").read_text())
    reasons = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {"notes.txt", "empty.png"}
    assert reasons["empty.png"] == "empty file"
    assert report["images"] == 1797


# --- Failures: one line, exit code 2, the traceback only with --debug ----------------------

REGISTERED = "digits"  # the registered model of the `sources` fixture
CLASSES = ["0", "1", "2"]  # the untrained bundle's


@pytest.fixture(scope="module")
def sources(
    untrained_bundle: Path, digits_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """What --model and --thresholds may wrongly name: a model folder without thresholds, a
    model of the same classes at another image size, thresholds for other classes, and a
    SQLite registry holding the untrained bundle as version 1, @champion (really registered);
    and an image to predict."""
    from opensig.decision import THRESHOLDS_FILE, write_thresholds
    from opensig.model import build_spec, create_model, model_digest, save_model_dir

    root = tmp_path_factory.mktemp("sources")
    bare = root / "no_thresholds"
    shutil.copytree(untrained_bundle, bare)
    (bare / THRESHOLDS_FILE).unlink()
    other_size = root / "size24"
    net = create_model("resnet10t", 3, 3)
    spec = build_spec(net, "resnet10t", ["0", "1", "2"], "sigmoid_bce", 3, 24, 3)
    save_model_dir(other_size, net, spec)
    other_classes = root / "ab.json"
    write_thresholds(other_classes, ["a", "b"], [0.5, 0.5], "fixed", {}, model_sha256="0" * 64)
    (root / "empty").mkdir()
    uri = register_bundle(untrained_bundle, untrained_bundle / THRESHOLDS_FILE, root, REGISTERED)
    return {
        "bundle": str(untrained_bundle),
        "digest": model_digest(untrained_bundle),
        "no_thresholds": str(bare),
        "other_size": str(other_size),
        "other_classes": str(other_classes),
        "empty": str(root / "empty"),
        "uri": uri,
        "root": str(root),
        "image": str(sorted((digits_data / "known" / "0").iterdir())[0]),
    }


# case: (--model and the options after it, what the one line must say)
FAILURES = {
    "mistyped folder": (["{root}/artifacts/modle"], "no such folder, and not a models:/"),
    "not a model folder": (["{empty}"], "not a model folder (no weights.safetensors or config"),
    "no thresholds": (["{no_thresholds}"], "no thresholds for model"),
    "thresholds for other classes": (
        ["{bundle}", "--thresholds", "{other_classes}"],
        "thresholds are for classes ['a', 'b'], the model has ['0', '1', '2']",
    ),
    "thresholds of another model": (
        ["{other_size}", "--thresholds", "{bundle}/thresholds.json"],
        "was tuned for another model",
    ),
    "unknown registered model": (
        ["models:/digit@champion", "--tracking-uri", "{uri}"],
        f"not found in {{uri}}: no registered model 'digit'; registered models: {REGISTERED}",
    ),
    "unknown alias": (
        [f"models:/{REGISTERED}@champoin", "--tracking-uri", "{uri}"],
        f"model '{REGISTERED}' has no alias @champoin; its aliases: @champion (version 1); "
        "its versions: 1",
    ),
    "unknown version": (
        [f"models:/{REGISTERED}/7", "--tracking-uri", "{uri}"],
        "has no version 7; its aliases: @champion (version 1); its versions: 1",
    ),
}


def command_line(command: str, model_args: list[str], sources: dict[str, str]) -> list[str]:
    """predict or export with --model and its options (placeholders filled from sources)."""
    out = Path(sources["root"]) / ("p.csv" if command == "predict" else "m.onnx")
    inputs = [sources["image"]] if command == "predict" else []
    filled = [arg.format(**sources) for arg in model_args]
    return [command, *inputs, "--model", *filled, "--out", str(out)]


def predicted(out: Path | str) -> list[dict]:
    """The rows of a predictions file, labels as written."""
    frame = pd.read_csv(out, dtype={"label": str}, keep_default_na=False)
    return frame.to_dict("records")


def decided(row: dict, thresholds: list[float]) -> str:
    """The label that ``thresholds`` give a predictions row by its class scores."""
    scores = np.array([[row[f"score_{c}"] for c in CLASSES]])
    [k] = decide(scores, np.array(thresholds))
    return UNKNOWN_LABEL if k == UNKNOWN else CLASSES[k]


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_failure_is_one_line_and_exit_2(
    sources: dict[str, str], case: str, command: str, caplog: pytest.LogCaptureFixture
) -> None:
    model_args, says = FAILURES[case]
    args = command_line(command, model_args, sources)

    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert error_lines(caplog) == [error_lines(caplog)[0]]
    line = error_lines(caplog)[0]
    assert line.startswith(f"{command} failed: ") and "\n" not in line
    assert says.format(**sources) in line
    assert "Traceback" not in caplog.text + result.output

    caplog.clear()
    result = invoke("--debug", *args)
    assert result.exit_code == 2
    first, *trace = error_lines(caplog)[0].splitlines()
    assert first == line and trace[0] == "Traceback (most recent call last):"


def test_force_uses_thresholds_of_another_model_with_a_warning(
    sources: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    model_args, _ = FAILURES["thresholds of another model"]
    result = invoke(*command_line("predict", model_args, sources), "--force")
    assert result.exit_code == 0, result.output
    assert "was tuned for another model" in caplog.text and "used anyway (--force)" in caplog.text
    [row] = predicted(Path(sources["root"]) / "p.csv")
    assert row["path"] == sources["image"] and row["error"] == ""
    assert row["label"] == decided(row, [0.5] * 3)  # by the bundle's thresholds, all 0.5


def test_thresholds_from_before_the_digest_load_with_a_warning(
    sources: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = json.loads((Path(sources["bundle"]) / "thresholds.json").read_text())
    assert old.pop("model_sha256") == sources["digest"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    args = [sources["other_size"], "--thresholds", str(tmp_path / "old.json")]
    result = invoke(*command_line("predict", args, sources))
    assert result.exit_code == 0, result.output  # no record of the model: cannot be refused
    assert "does not record the model it was tuned for" in caplog.text
    [row] = predicted(Path(sources["root"]) / "p.csv")
    assert row["error"] == "" and row["label"] == decided(row, [0.5] * 3)


NEVER = 2.0  # a threshold above any score (scores lie in [0, 1]): the class is never named


def test_a_registered_model_loads_with_its_own_thresholds(
    untrained_bundle: Path, digits_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered with thresholds that make every image a '1', then tuned again locally to
    thresholds that name no class: the registered model still says '1' (the local files
    would say 'unknown'), so it decides with the thresholds registered with it."""
    from opensig.decision import FEATURE_SCORE_FILE, THRESHOLDS_FILE, write_thresholds
    from opensig.model import model_digest

    monkeypatch.chdir(tmp_path)
    model, thresholds = Path("artifacts/model"), Path("artifacts/thresholds.json")
    shutil.copytree(  # a training output: weights and spec, its thresholds beside it
        untrained_bundle, model, ignore=shutil.ignore_patterns(THRESHOLDS_FILE, FEATURE_SCORE_FILE)
    )
    digest = model_digest(model)
    write_thresholds(thresholds, CLASSES, [NEVER, 0.0, NEVER], "fixed", {}, model_sha256=digest)
    uri = register_bundle(model, thresholds, tmp_path, "retuned")
    write_thresholds(thresholds, CLASSES, [NEVER] * 3, "fixed", {}, model_sha256=digest)
    images = [str(p) for p in sorted((digits_data / "known" / "0").iterdir())[:3]]

    by_uri = ["models:/retuned@champion", "--tracking-uri", uri]
    result = invoke("predict", *images, "--model", *by_uri, "--out", "registered.csv")
    assert result.exit_code == 0, result.output
    local = ["--model", str(model), "--thresholds", str(thresholds), "--out", "local.csv"]
    result = invoke("predict", *images, *local)
    assert result.exit_code == 0, result.output

    registered = predicted("registered.csv")
    assert [(r["path"], r["label"], r["error"]) for r in registered] == [
        (image, "1", "") for image in images
    ]
    assert [r["label"] for r in predicted("local.csv")] == [UNKNOWN_LABEL] * 3
    # the same model: the same scores, only the thresholds differ
    for ours, theirs in zip(registered, predicted("local.csv"), strict=True):
        for c in CLASSES:
            assert ours[f"score_{c}"] == pytest.approx(theirs[f"score_{c}"], abs=1e-6)


def test_the_failure_line_is_all_of_stderr(tmp_path: Path) -> None:
    """The contract as a shell sees it: a real process, its stderr and exit status."""
    command = [sys.executable, "-m", "opensig", "predict", "x.png", "--model", "artifacts/modle"]
    env = {k: v for k, v in os.environ.items() if k != "OPENSIG_DEBUG"}
    quiet = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert quiet.returncode == 2
    assert len(quiet.stderr.splitlines()) == 1, quiet.stderr
    assert "predict failed: --model artifacts/modle: no such folder" in quiet.stderr
    debug = subprocess.run(
        command, cwd=tmp_path, env={**env, "OPENSIG_DEBUG": "1"}, capture_output=True, text=True
    )
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    first_line = debug.stderr.splitlines()[0]
    assert first_line.partition(" ERROR ")[2] == quiet.stderr.partition(" ERROR ")[2].strip()


@pytest.mark.parametrize("args", [["ingest"], ["bench", "openset"]], ids=str)
def test_every_command_fails_through_the_one_wrapper(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Stages and benches as predict and export (retrain: tests/test_retrain.py)."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    result = invoke(*args)
    assert result.exit_code == 2
    assert error_lines(caplog) == [
        f"{args[0]} failed: params.yaml: params file not found "
        "(run from the project folder or pass --params)"
    ]


@pytest.mark.parametrize("script", ["pipelines/monitor.py", "pipelines/retrain.py"])
def test_a_flow_script_names_itself_as_it_is_run(script: str) -> None:
    from tests.conftest import REPO

    shown = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert f"Usage: python {script} [OPTIONS]" in shown.stdout
    assert "-flow" not in shown.stdout.split("[OPTIONS]")[0] and " retrain [" not in shown.stdout


def test_registering_a_model_prints_no_warning(
    untrained_bundle: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """MLflow's input_example UserWarning on every `register`: noise on a schedule."""
    from opensig.decision import THRESHOLDS_FILE

    register_bundle(untrained_bundle, untrained_bundle / THRESHOLDS_FILE, tmp_path, "quiet")
    assert not [w for w in recwarn if "input example" in str(w.message)]
