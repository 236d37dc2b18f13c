"""The prediction log: layout, columns, one file per batch, unified reads, bad input."""

from __future__ import annotations

import hashlib
import multiprocessing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from opensig.monitoring.log import PredictionLog, read_log
from opensig.tracking.model_uri import model_identity


def _frame(paths: list[str], classes: list[str], label: str = "a") -> pd.DataFrame:
    """A frame shaped like Bundle.predict's output."""
    frame = pd.DataFrame({"path": paths, "label": label, "score": 0.9})
    for c in classes:
        frame[f"score_{c}"] = 0.5
    frame["error"] = ""
    return frame


def test_append_writes_one_file_per_batch_with_the_columns(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"not really a png")
    log = PredictionLog(str(tmp_path / "log"), "opensig", "3")
    log.append(_frame([str(image), "gone.png"], ["a", "b"]), [image, tmp_path / "gone.png"])
    log.append(_frame(["image[0]"], ["a", "b"], label="unknown"), [b"raw"])
    files = sorted((tmp_path / "log").glob("date=*/*.parquet"))
    assert len(files) == 2
    assert files[0].parent.name == f"date={datetime.now(timezone.utc):%Y-%m-%d}"
    assert not list((tmp_path / "log").rglob(".*"))  # no temp file left
    names = pq.read_schema(files[0]).names
    assert names == [
        *("time", "model", "model_version", "path", "sha256", "label", "score"),
        *("score_a", "score_b", "error"),
    ]
    frame = read_log(str(tmp_path / "log"))
    assert len(frame) == 3
    assert list(frame["model_version"]) == ["3"] * 3
    assert pd.isna(frame["sha256"].iloc[1])  # the file that was gone
    assert frame["sha256"].iloc[0] == hashlib.sha256(b"not really a png").hexdigest()
    assert frame["sha256"].iloc[2] == hashlib.sha256(b"raw").hexdigest()  # bytes: their own
    assert str(frame["time"].dtype) == "datetime64[us, UTC]"
    assert len(pd.read_parquet(tmp_path / "log")) == 3  # plain pandas reads it too


def _append_in_child(root: str) -> None:
    PredictionLog(root, "m", "1").append(_frame(["p"], ["a"]), [b"x"])


def test_each_process_writes_its_own_files(tmp_path: Path) -> None:
    root = str(tmp_path / "log")
    log = PredictionLog(root, "m", "1")
    log.append(_frame(["p"], ["a"]), [b"x"])
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_append_in_child, args=(root,)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    files = list((tmp_path / "log").glob("*/*.parquet"))
    assert len({f.name.split("-")[1] for f in files}) == 3  # three pids, three files


def test_read_log_unifies_schemas_and_filters(tmp_path: Path) -> None:
    root = str(tmp_path / "log")
    PredictionLog(root, "m", "1").append(_frame(["p1"], ["a"]), [b"1"])
    multi = _frame(["p2"], ["a", "b"])
    multi.insert(2, "labels", "a|b")
    PredictionLog(root, "m", "2").append(multi, [b"2"])
    frame = read_log(root)
    assert list(frame.columns)[-4:] == ["score_a", "score_b", "labels", "error"]
    assert pd.isna(frame["score_b"].iloc[0])
    assert list(read_log(root, model_version="2")["path"]) == ["p2"]
    later = datetime.now(timezone.utc) + timedelta(days=2)
    with pytest.raises(ValueError, match=r"no rows of model version '1'"):
        read_log(root, since=later, model_version="1")


def test_missing_or_empty_log_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        read_log(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        read_log(str(tmp_path / "empty"))


def test_another_model_version_is_named(tmp_path: Path) -> None:
    root = str(tmp_path / "log")
    PredictionLog(root, "m", "1").append(_frame(["p"], ["a"]), [b"x"])
    with pytest.raises(ValueError, match=r"'7'.*\['1'\]"):
        read_log(root, model_version="7")


def test_file_cut_short_is_named(tmp_path: Path) -> None:
    root = str(tmp_path / "log")
    PredictionLog(root, "m", "1").append(_frame(["p"] * 50, ["a"]), [b"x"] * 50)
    (path,) = (tmp_path / "log").glob("*/*.parquet")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=path.name):
        read_log(root)


def test_fsspec_url(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/log"
    PredictionLog(root, "m", "1").append(_frame(["p"], ["a"]), [b"x"])
    assert list(read_log(root)["path"]) == ["p"]


def test_model_identity_of_an_alias_is_the_registered_version(
    tmp_path: Path, untrained_bundle: Path
) -> None:
    """MLflow answers an alias with an int version: the log gets the registry's name and
    version, as for models:/name/version, not a crash."""
    from mlflow import MlflowClient

    from opensig.model import model_digest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("opensig")
    client.create_model_version("opensig", str(untrained_bundle))
    client.set_registered_model_alias("opensig", "champion", "1")
    for model in ("models:/opensig@champion", "models:/opensig/1"):
        assert model_identity(model, untrained_bundle, uri) == ("opensig", "1")
    folder = str(untrained_bundle)
    assert model_identity(folder, untrained_bundle) == (folder, model_digest(untrained_bundle))
