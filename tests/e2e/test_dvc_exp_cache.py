"""A DVC experiment run in a temporary copy of the repository (`dvc exp run --temp`, as a
queued one runs) reads the project's decode cache instead of decoding everything again in
its copy, which DVC deletes afterwards."""

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
