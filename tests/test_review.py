"""Review batches: selection, export and the import rules, on real digits images."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageOps

from opensig.label_studio import label_config, write_label_studio
from opensig.review import (
    IMPORTED,
    REVIEW_CSV,
    _action,
    import_batch,
    read_imports,
    select_for_review,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its content hash: to assert that nothing changed."""
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path: Path, digits_data: Path) -> Path:
    """A small data folder: classes 0 and 1 (3 images each), unknown source 6 (2 images)."""
    root = tmp_path / "data"
    for rel, n in (("known/0", 3), ("known/1", 3), ("unknown/6", 2)):
        (root / rel).mkdir(parents=True)
        for image in sorted((digits_data / rel).iterdir())[:n]:
            shutil.copy2(image, root / rel / image.name)
    return root


def _digit(digits_data: Path, rel: str, i: int) -> Path:
    return sorted((digits_data / rel).iterdir())[i]


def _put(image: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(image, folder / (name or image.name)))


def test_import_sorts_folders_into_data_and_is_idempotent(
    tmp_path: Path, data: Path, digits_data: Path
) -> None:
    batch = tmp_path / "review" / "b1"
    labeled = batch / "labeled"
    new2 = [_put(_digit(digits_data, "known/2", i), labeled / "2") for i in range(3)]
    _put(_digit(digits_data, "known/0", 5), labeled / "0", "a.png")  # more of a class
    _put(_digit(digits_data, "unknown/7", 0), labeled / "unknown" / "7")
    _put(_digit(digits_data, "unknown/7", 1), labeled / "unknown")  # no source: 'review'
    _put(sorted((data / "known/1").iterdir())[0], labeled / "1")  # in data under 1 already
    taken = _put(_digit(digits_data, "known/0", 6), labeled / "0", "b.png")
    _put(_digit(digits_data, "known/0", 7), data / "known/0", "b.png")  # name taken in data
    _put(_digit(digits_data, "known/3", 0), batch / "inbox" / "unknown")  # left: skipped
    (labeled / "2" / "notes.txt").write_text("not an image")

    report = import_batch(batch, data)

    assert report["added"] == {"0": 2, "2": 3, "unknown": 2}
    assert report["new_classes"] == ["2"]
    assert report["classes"] == ["0", "1", "2"]
    assert sorted(_sha(p) for p in (data / "known/2").iterdir()) == sorted(_sha(p) for p in new2)
    assert (data / "unknown/7").is_dir() and len(list((data / "unknown/review").iterdir())) == 1
    assert _sha(data / "known/0/b.png") != _sha(taken)  # never overwritten: b-1.png instead
    assert _sha(data / "known/0/b-1.png") == _sha(taken)
    by_file = {row["file"]: row for row in report["files"]}
    assert by_file["labeled/1/" + sorted((data / "known/1").iterdir())[0].name]["status"] == (
        "already in data"
    )
    assert by_file["labeled/2/notes.txt"]["status"] == "skipped"
    assert read_imports(batch) == [report]

    before = _tree(data)
    again = import_batch(batch, data)
    assert again["added"] == {} and again["new_classes"] == []
    assert _tree(data) == before
    assert {r["status"] for r in again["files"]} == {"already in data", "skipped"}
    assert read_imports(batch) == [report, again]  # the first import's record is kept


def test_a_class_that_is_an_unknown_source_is_refused_or_moved_in_first(
    tmp_path: Path, data: Path, digits_data: Path
) -> None:
    """The held-out source `6` became a class once its images were reviewed."""
    batch = tmp_path / "b"
    _put(_digit(digits_data, "unknown/6", 5), batch / "labeled" / "6")
    _put(_digit(digits_data, "known/2", 0), batch / "labeled" / "2")
    before = _tree(data)
    with pytest.raises(ValueError, match=r"class '6' is also an unknown source .*--from-unknown 6"):
        import_batch(batch, data)
    with pytest.raises(ValueError, match=r"class '2' is in data.holdout_unknown"):
        import_batch(batch, data, holdout=["2"])
    with pytest.raises(ValueError, match=r"--from-unknown 7: there is no .*unknown/7/"):
        import_batch(batch, data, from_unknown=["7"])
    assert _tree(data) == before and not (batch / IMPORTED).exists()

    old = sorted(_sha(p) for p in (data / "unknown/6").iterdir())
    report = import_batch(batch, data, holdout=["6"], from_unknown=["6"])
    assert not (data / "unknown/6").exists()
    assert sorted(_sha(p) for p in (data / "known/6").iterdir()) == sorted(
        [*old, _sha(_digit(digits_data, "unknown/6", 5))]
    )
    assert report["added"] == {"2": 1, "6": 1} and report["new_classes"] == ["2", "6"]
    (moved,) = report["moved_from_unknown"]
    assert moved["source"] == "6" and len(moved["files"]) == 2
    assert read_imports(batch) == [report]


def test_import_reports_two_labels_and_a_label_already_in_data(
    tmp_path: Path, data: Path, digits_data: Path
) -> None:
    batch = tmp_path / "b"
    both = _digit(digits_data, "known/2", 0)
    _put(both, batch / "labeled" / "2")
    _put(both, batch / "labeled" / "3")
    _put(sorted((data / "known/0").iterdir())[0], batch / "labeled" / "1")  # data says 0
    _put(_digit(digits_data, "known/4", 0), batch / "labeled" / "4")

    report = import_batch(batch, data)

    assert report["added"] == {"4": 1}
    conflicts = [r for r in report["files"] if r["status"] == "conflict"]
    assert len(conflicts) == 2
    assert any("labeled differently in this batch" in r["reason"] for r in conflicts)
    assert any("already in the data as 0" in r["reason"] for r in conflicts)
    assert not (data / "known/2").exists() and not (data / "known/3").exists()


@pytest.mark.parametrize("name", ["Unknown", "_unknown_", "a|b"])
def test_import_refuses_a_class_ingest_would_refuse(
    tmp_path: Path, data: Path, digits_data: Path, name: str
) -> None:
    batch = tmp_path / "b"
    _put(_digit(digits_data, "known/2", 0), batch / "labeled" / "2")  # fine, but not copied
    _put(_digit(digits_data, "known/3", 0), batch / "labeled" / name)
    before = _tree(data)
    with pytest.raises(
        ValueError, match=rf"labeled/{re.escape(name)}.*is not allowed.*nothing was imported"
    ):
        import_batch(batch, data)
    assert _tree(data) == before
    assert not (batch / IMPORTED).exists()


def test_import_reads_the_label_column_and_refuses_labels_of_deleted_files(
    tmp_path: Path, data: Path, digits_data: Path
) -> None:
    batch = tmp_path / "b"
    kept = _put(_digit(digits_data, "known/2", 0), batch / "inbox" / "unknown")
    gone = _put(_digit(digits_data, "known/3", 0), batch / "inbox" / "unknown", "gone.png")
    moved = _put(_digit(digits_data, "known/4", 0), batch / "labeled" / "4")  # also in the CSV
    table = pd.DataFrame(
        {
            "file": ["inbox/unknown/" + kept.name, "inbox/unknown/gone.png", "inbox/4/m.png"],
            "sha256": [_sha(kept), _sha(gone), _sha(moved)],
            "label": ["2", "3", "4"],
        }
    )
    table.to_csv(batch / REVIEW_CSV, index=False)
    gone.unlink()
    before = _tree(data)
    with pytest.raises(ValueError, match=r"labeled files have gone.*gone\.png.*line 3"):
        import_batch(batch, data)
    assert _tree(data) == before

    table.loc[1, "label"] = ""  # the reviewer clears the label of the deleted file
    table.to_csv(batch / REVIEW_CSV, index=False)
    report = import_batch(batch, data)
    assert report["added"] == {"2": 1, "4": 1}  # the moved file counts once
    assert report["new_classes"] == ["2", "4"]


def test_import_of_a_missing_batch_names_it(tmp_path: Path, data: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"review batch .*nope does not exist"):
        import_batch(tmp_path / "nope", data)


def _log(rows: list[dict]) -> pd.DataFrame:
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    frame = pd.DataFrame(rows)
    frame.insert(0, "time", [start + timedelta(minutes=i) for i in range(len(rows))])
    frame["error"] = frame.get("error", "")
    return frame.fillna({"error": ""})


def test_selection_takes_unknowns_then_smallest_margins_once_each() -> None:
    rows = _log(
        [
            {"path": "a", "sha256": "h1", "label": "unknown", "score": 0.2},
            {"path": "b", "sha256": "h2", "label": "cat", "score": 0.95},
            {"path": "c", "sha256": "h3", "label": "cat", "score": 0.62},
            {"path": "d", "sha256": "h4", "label": "dog", "score": 0.31},
            {"path": "e", "sha256": "h5", "label": "unknown", "score": 0.4},
            {"path": "a2", "sha256": "h1", "label": "unknown", "score": 0.2},  # same image
            {"path": "f", "sha256": "h6", "label": "dog", "score": 0.9},  # in data
            {"path": "g", "sha256": None, "label": None, "score": None, "error": "bad"},
        ]
    )
    picked = select_for_review(rows, {"h6"}, 4, {"cat": 0.6, "dog": 0.3})
    assert list(picked["path"]) == ["a2", "e", "d", "c"]  # newest unknowns; margins .01, .02
    assert picked["margin"].iloc[2:].round(3).tolist() == [0.01, 0.02]
    no_thresholds = select_for_review(rows, set(), 10, None)
    assert list(no_thresholds["path"]) == ["a2", "e", "d", "c", "f", "b"]  # by score


def test_an_unknown_gets_its_nearest_class_and_how_far_under_its_threshold() -> None:
    rows = _log(
        [
            {
                "path": "u",
                "sha256": "h1",
                "label": "unknown",
                "score": 0.4,
                "score_cat": 0.1,
                "score_dog": 0.4,
            },
            {
                "path": "k",
                "sha256": "h2",
                "label": "cat",
                "score": 0.7,
                "score_cat": 0.7,
                "score_dog": 0.05,
            },
            {"path": "o", "sha256": "h3", "label": "unknown", "score": 0.2},  # older classes
        ]
    )
    picked = select_for_review(rows, set(), 10, {"cat": 0.6, "dog": 0.5})
    by_path = picked.set_index("path")
    assert by_path.loc["u", "nearest"] == "dog"
    assert by_path.loc["u", "margin"] == pytest.approx(-0.1)
    assert by_path.loc["k", "margin"] == pytest.approx(0.1) and pd.isna(by_path.loc["k", "nearest"])
    assert pd.isna(by_path.loc["o", "margin"]) and pd.isna(by_path.loc["o", "nearest"])
    assert "nearest 'dog', 0.100 under its threshold" in _action("unknown", -0.1, "dog")
    assert "nearest" not in _action("unknown", float("nan"), None)


def _invoke(*args: str) -> str:
    from typer.testing import CliRunner

    from opensig.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_export_then_import_through_the_cli(
    project: Path, untrained_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real log of a real model's predictions -> a batch -> the reviewer -> data/."""
    from opensig.monitoring.log import PredictionLog
    from opensig.predict import Bundle

    inbox = project / "production"
    inbox.mkdir()
    seen = sorted((project / "data/known/3").iterdir())[:2]  # in data already: never exported
    new = []
    for i, image in enumerate(sorted((project / "data/known/4").iterdir())[:6]):
        new.append(inbox / f"new{i}.png")
        ImageOps.mirror(Image.open(image)).save(new[-1])  # images data/ does not hold
    sources = [*seen, *new]
    bundle = Bundle.load(untrained_bundle, device="cpu")
    frame = bundle.predict(sources, progress=False, num_workers=0)
    log = PredictionLog(str(project / "log"), "opensig", "1")
    log.append(frame, sources)
    ImageOps.flip(Image.open(new[1])).save(buffer := io.BytesIO(), format="PNG")
    sent = [new[0].read_bytes(), buffer.getvalue()]  # to the served model: new0 and an image
    log.append(bundle.predict(sent, names=["image[0]", "image[1]"], num_workers=0), sent)
    new[5].unlink()  # predicted, then deleted

    output = _invoke(
        "review", "export", "--log", "log", "--out", "review", "--format", "label-studio",
        "--model", str(untrained_bundle),
    )  # fmt: skip
    batch = Path(output.strip().splitlines()[-1])
    listing = pd.read_csv(batch / REVIEW_CSV, dtype=str, keep_default_na=False)
    assert sorted(listing["original_path"]) == sorted([*map(str, new), "image[1]"])
    assert listing["sha256"].is_unique
    reasons = dict(zip(listing["original_path"], listing["reason"], strict=True))
    assert "file not found" in reasons[str(new[5])]
    assert "as bytes" in reasons["image[1]"]
    copied = listing[listing["file"] != ""]
    assert len(copied) == 5  # new0 came as bytes later too: listed once, from its file
    for rec in copied.to_dict("records"):
        assert rec["file"].startswith(f"inbox/{rec['predicted_label']}/")
        assert _sha(batch / rec["file"]) == rec["sha256"]
    assert all(p.exists() for p in new[:5])  # copied, never moved
    tasks = json.loads((batch / "label-studio/tasks.json").read_text())
    assert len(tasks) == 5
    assert tasks[0]["data"]["image"].startswith(f"/data/local-files/?d={batch.name}/inbox/")
    assert '<Choice value="unknown"/>' in (batch / "label-studio/config.xml").read_text()

    again = Path(_invoke("review", "export", "--log", "log").strip().splitlines()[-1])
    assert pd.read_csv(again / REVIEW_CSV).empty  # everything was exported already

    for rec in copied.to_dict("records"):  # the reviewer: a new class, 'mirrored'
        target = batch / "labeled/mirrored" / Path(rec["file"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        (batch / rec["file"]).rename(target)
    with caplog.at_level("INFO"):
        _invoke("review", "import", str(batch))
    report = read_imports(batch)[-1]
    assert report["added"] == {"mirrored": 5} and report["new_classes"] == ["mirrored"]
    assert len(list((project / "data/known/mirrored").iterdir())) == 5
    assert "dvc add data && dvc repro" in caplog.text  # no Prefect API here


def test_label_config_lists_the_classes_and_unknown() -> None:
    config = label_config(["cat", 'say "hi"'])
    assert '<Choice value="cat"/>' in config and "<Choice value='say \"hi\"'/>" in config
    assert config.index('"cat"') < config.index('"unknown"')
    assert 'name="new_class"' in config


def test_label_studio_tasks_serve_files_inside_the_review_folder_only(
    tmp_path: Path, digits_data: Path
) -> None:
    review = tmp_path / "review"
    image = _put(_digit(digits_data, "known/0", 0), review / "batch-1/inbox/0", "a.png")
    listing = pd.DataFrame(
        [{"file": "inbox/0/a.png", "sha256": _sha(image), "predicted_label": "0", "score": 0.9}]
    )
    tasks = write_label_studio(review / "batch-1", listing, ["0"], review)
    assert json.loads(tasks.read_text())[0]["data"]["image"].endswith("d=batch-1/inbox/0/a.png")
    image.unlink()
    image.symlink_to(_digit(digits_data, "known/0", 1))  # a link out of the review folder
    with pytest.raises(ValueError, match=r"a\.png leads to .*, outside the review folder"):
        write_label_studio(review / "batch-1", listing, ["0"], review)


def test_import_tells_a_prefect_server_that_data_was_added(
    project: Path, digits_data: Path, prefect_server: str
) -> None:
    """`opensig review import`, a real process, emits opensig.data.added to a real server."""
    import subprocess
    import sys
    import time

    import httpx

    from opensig.events import DATA_ADDED, project_resource
    from tests.conftest import REPO

    batch = project / "review" / "b"
    image = sorted((digits_data / "known/5").iterdir())[0]
    (batch / "labeled/mirrored").mkdir(parents=True)
    ImageOps.mirror(Image.open(image)).save(batch / "labeled/mirrored/m.png")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(REPO / "src")}
    subprocess.run(
        [sys.executable, "-m", "opensig", "review", "import", str(batch)],
        env=env,
        check=True,
        timeout=300,
    )
    body = {"filter": {"event": {"name": [DATA_ADDED]}}, "limit": 50}
    deadline = time.monotonic() + 30  # the server stores events asynchronously
    while not (found := httpx.post(f"{prefect_server}/events/filter", json=body).json()["events"]):
        assert time.monotonic() < deadline, "the event never reached the server"
        time.sleep(0.5)
    (event,) = found
    assert event["resource"]["prefect.resource.id"] == project_resource(project)
    assert event["payload"]["added"] == {"mirrored": 1}
    assert event["payload"]["new_classes"] == ["mirrored"]
    assert "mirrored" in event["payload"]["classes"]


def test_export_of_a_multi_label_log_is_refused_in_one_line(
    project: Path, untrained_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch carries one label per image: a log of label sets is refused at export, before
    a person sorts anything, naming the log and what to do instead."""
    from typer.testing import CliRunner

    from opensig.cli import app
    from opensig.monitoring.log import PredictionLog
    from opensig.predict import Bundle

    sources = sorted((project / "data/known/4").iterdir())[:3]
    frame = Bundle.load(untrained_bundle, device="cpu").predict(
        sources, progress=False, num_workers=0, multi_label=True
    )
    PredictionLog(str(project / "log"), "opensig", "1").append(frame, sources)

    result = CliRunner().invoke(app, ["review", "export", "--log", "log", "--out", "review"])
    assert result.exit_code == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith("review failed: log: multi-label predictions (a labels column)")
    assert "multi-label review is not supported yet" in line and "without --multi-label" in line
    assert not (project / "review").exists()
