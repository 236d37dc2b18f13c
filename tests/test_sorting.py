"""predict --sort-into: images copied or linked into label folders, sources never touched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from opensig.cli import app
from opensig.sorting import bucket_name, parse_buckets, sort_into


def test_parse_buckets() -> None:
    assert parse_buckets(None) == [] and parse_buckets("") == []
    assert parse_buckets("0.5,0.8") == [0.5, 0.8]
    for bad in ("0.8,0.5", "0.5,0.5", "1.2", "0", "x"):
        with pytest.raises(ValueError, match="--buckets"):
            parse_buckets(bad)


@pytest.mark.parametrize(
    ("score", "folder"),
    [
        (0.0, "score_0.00-0.50"),
        (0.49, "score_0.00-0.50"),
        (0.5, "score_0.50-0.80"),  # a cut belongs to the range it starts
        (0.79, "score_0.50-0.80"),
        (0.8, "score_0.80-1.00"),
        (1.0, "score_0.80-1.00"),
    ],
)
def test_bucket_name(score: float, folder: str) -> None:
    assert bucket_name(score, [0.5, 0.8]) == folder


def _image(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _frame(rows: list[tuple[Path, str | None, float, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"path": str(p), "label": lab, "score": s, "error": e} for p, lab, s, e in rows]
    )


def test_copies_never_overwrite_and_leave_sources_alone(tmp_path: Path) -> None:
    a = _image(tmp_path / "in/a.png", b"cat one")
    b = _image(tmp_path / "in/sub/a.png", b"cat two")  # same name, another folder
    c = _image(tmp_path / "in/c.png", b"a car")
    bad = tmp_path / "in/broken.png"
    out = tmp_path / "sorted"
    _image(out / "cat" / "a.png", b"was here before")
    stat = a.stat()

    placed = sort_into(
        _frame(
            [
                (a, "cat", 0.9, ""),
                (b, "cat", 0.7, ""),
                (c, "unknown", 0.2, ""),
                (bad, None, float("nan"), "OSError: truncated"),
            ]
        ),
        out,
    )
    assert (out / "cat" / "a.png").read_bytes() == b"was here before"  # untouched
    assert (out / "cat" / "a-1.png").read_bytes() == b"cat one"
    assert (out / "cat" / "a-2.png").read_bytes() == b"cat two"
    assert (out / "unknown" / "c.png").read_bytes() == b"a car"
    assert a.read_bytes() == b"cat one" and a.stat().st_mtime_ns == stat.st_mtime_ns
    assert list(placed["how"]) == ["copy", "copy", "copy", ""]
    assert placed.iloc[3]["error"] == "OSError: truncated" and placed.iloc[3]["destination"] == ""
    assert pd.read_csv(out / "sorted.csv", keep_default_na=False).shape == (4, 6)


def test_links_buckets_multi_label_and_a_second_manifest(tmp_path: Path) -> None:
    a = _image(tmp_path / "in/a.png", b"A")
    b = _image(tmp_path / "in/b.png", b"B")
    out = tmp_path / "sorted"
    frame = _frame([(a, "cat", 0.95, ""), (b, "dog", 0.6, "")])
    frame["labels"] = ["cat|dog", "dog"]
    placed = sort_into(frame, out, link=True, cuts=[0.5, 0.8])
    assert os.path.samefile(out / "cat/score_0.80-1.00/a.png", a)
    assert os.path.samefile(out / "dog/score_0.80-1.00/a.png", a)
    assert os.path.samefile(out / "dog/score_0.50-0.80/b.png", b)
    assert list(placed["how"]) == ["link"] * 3
    sort_into(frame, out, link=True, cuts=[0.5, 0.8])  # again: new names, a new manifest
    assert (out / "sorted.csv").is_file() and (out / "sorted-1.csv").is_file()
    assert (out / "dog/score_0.50-0.80/b-1.png").is_file()


def test_cli_sorts_a_folder_and_refuses_a_destination_inside_it(
    untrained_bundle: Path, digits_data: Path, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    shutil.copytree(digits_data / "known" / "0", inbox)
    (inbox / "notes.jpg").write_text("not an image")
    n_images = len(list(inbox.iterdir())) - 1
    out, preds = tmp_path / "sorted", tmp_path / "preds.csv"
    args = ["predict", str(inbox), "--model", str(untrained_bundle), "--out", str(preds)]
    result = CliRunner().invoke(app, [*args, "--sort-into", str(out), "--buckets", "0.5"])
    assert result.exit_code == 0, result.output

    placed = pd.read_csv(out / "sorted.csv", keep_default_na=False)
    assert (placed["destination"] != "").sum() == n_images
    assert placed[placed["destination"] == ""]["source"].str.endswith("notes.jpg").all()
    predictions = pd.read_csv(preds, keep_default_na=False).set_index("path")
    for row in placed[placed["destination"] != ""].itertuples():
        assert Path(row.destination).parent.parent.name == predictions.loc[row.source, "label"]
    assert len(list(inbox.iterdir())) == n_images + 1  # nothing moved out of the inbox

    inside = CliRunner().invoke(app, [*args, "--sort-into", str(inbox / "sorted")])
    assert inside.exit_code != 0 and "inside the input folder" in inside.output
    orphan = CliRunner().invoke(app, [*args, "--link"])
    assert orphan.exit_code != 0 and "--sort-into" in orphan.output
