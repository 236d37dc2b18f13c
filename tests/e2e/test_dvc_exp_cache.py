"""A DVC experiment run in a temporary copy of the repository (`dvc exp run --temp`, and a
queued one, `dvc exp run --queue` + `--run-all`) reads the project's decode cache instead of
decoding everything again in its copy, and logs to the project's MLflow store, not to one
that DVC deletes with the copy."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from opensig.data.cache import usage
from tests.conftest import dvc_project, tool

pytestmark = pytest.mark.e2e

PER_FOLDER = 25


def test_a_temp_experiment_reuses_the_projects_decode_cache(
    tmp_path: Path, digits_data: Path
) -> None:
    subset = tmp_path / "project" / "data"
    for folder in sorted(p for p in digits_data.glob("*/*") if p.is_dir()):
        target = subset / folder.relative_to(digits_data)
        target.mkdir(parents=True)
        for image in sorted(folder.iterdir())[:PER_FOLDER]:
            shutil.copy(image, target / image.name)
    root = dvc_project(tmp_path / "project", subset, {"train": {"epochs": 1}})
    first = tool("dvc", "repro", "train", cwd=root)
    assert first.returncode == 0, first.stdout + first.stderr
    [filled] = usage(root / "artifacts" / "cache")
    assert "decoded now" in first.stdout + first.stderr and filled.entries > 0

    exp = tool("dvc", "exp", "run", "--temp", "train", "-S", "train.lr=0.002", cwd=root)
    said = exp.stdout + exp.stderr
    assert exp.returncode == 0, said
    assert f"{root / 'artifacts' / 'cache' / 'decoded'}" in said  # the project's, not a copy's
    assert re.findall(r"\((\d+) decoded now\)", said) == ["0", "0"]  # train and val: none
    [after] = usage(root / "artifacts" / "cache")
    assert (after.entries, after.shards) == (filled.entries, filled.shards)
    assert _runs(root) == 2  # the repro's and the temp experiment's training runs

    queued = tool("dvc", "exp", "run", "--queue", "train", "-S", "train.lr=0.004", cwd=root)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    ran = tool("dvc", "exp", "run", "--run-all", cwd=root)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    shown = tool("dvc", "exp", "show", "--csv", cwd=root).stdout
    assert "0.004" in shown, shown  # the queued experiment ran and was kept
    assert _runs(root) == 3  # ... and its run is in the project's store
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))


def _runs(root: Path) -> int:
    """Runs in the project's own MLflow store (the default sqlite:///mlflow.db)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids))
