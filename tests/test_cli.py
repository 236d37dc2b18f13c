"""The command line: bad input fails fast with a message naming the key or path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opensig.cli import app
from tests.conftest import write_params


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
