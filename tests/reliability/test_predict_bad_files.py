"""Predict on a folder where some files are bad: the good ones are labelled, the bad reported."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from opensig.cli import app
from tests.reliability import messy

CLASSES = ["0", "1", "2"]  # the untrained_bundle fixture's classes


def test_good_files_are_predicted_and_bad_ones_reported(
    untrained_bundle: Path, digits_data: Path, tmp_path: Path, caplog
) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    good = sorted((digits_data / "known" / "0").iterdir())[:5]
    for path in good:
        shutil.copy(path, folder / path.name)
    messy.cmyk_jpeg(folder / "cmyk.jpg")
    bad = {
        "truncated.jpg": messy.truncated_jpeg(folder / "truncated.jpg"),
        "notes.jpg": messy.text_as_jpeg(folder / "notes.jpg"),
        "empty.png": messy.write(folder / "empty.png", b""),
        "bomb.png": messy.png_bomb(folder / "bomb.png"),
        ".hidden.png": messy.grayscale(folder / ".hidden.png"),
    }
    os.symlink(".", folder / "loop")
    missing = tmp_path / "not_there.png"
    out = tmp_path / "predictions.csv"

    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(
            app,
            [
                "predict",
                str(folder),
                str(missing),
                "--model",
                str(untrained_bundle),
                "--out",
                str(out),
            ],
        )
    assert result.exit_code == 1, result.output  # an input does not exist: not a success
    frame = pd.read_csv(out, keep_default_na=False)
    by_name = {Path(p).name: row for p, row in zip(frame["path"], frame.itertuples(), strict=True)}
    n_good = len(good) + 1  # the digits and the CMYK photo
    assert len(frame) == n_good + len(bad) + 2  # + the loop and the missing file
    predicted = frame[frame["error"] == ""]
    assert len(predicted) == n_good
    assert set(predicted["label"]) <= {*CLASSES, "unknown"}
    for name in bad:
        assert by_name[name].error and by_name[name].label == "", name
    assert "decompression bomb" in by_name["bomb.png"].error
    assert "hidden file" in by_name[".hidden.png"].error
    assert "symlink loop" in by_name["loop"].error
    assert by_name["not_there.png"].error
    assert f"{n_good} predicted" in caplog.text and f"{len(bad) + 2} not predicted" in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        f"predict: 1 input(s) do not exist: {missing} (the other inputs are predicted in {out})"
    ]


def test_only_existing_inputs_exit_zero(
    untrained_bundle: Path, digits_data: Path, tmp_path: Path
) -> None:
    image = next((digits_data / "known" / "0").iterdir())
    out = tmp_path / "p.csv"
    args = ["predict", str(image), "--model", str(untrained_bundle), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == 1
