"""`dvc repro` in a temp git repo: the whole pipeline runs, and a second repro does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_params

pytestmark = pytest.mark.e2e


def sh(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_dvc_repro_runs_all_stages_then_is_up_to_date(tmp_path: Path, digits_data: Path) -> None:
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    write_params(tmp_path, {"train": {"epochs": 1}})
    shutil.copytree(digits_data, tmp_path / "data")
    sh("git", "init", "-q", cwd=tmp_path)
    sh("dvc", "init", "-q", cwd=tmp_path)
    sh("dvc", "add", "-q", "data", cwd=tmp_path)

    first = sh("dvc", "repro", cwd=tmp_path)
    for stage in ["ingest", "train", "tune", "evaluate", "register"]:
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["known_accuracy"] > 0.5
    registered = json.loads((tmp_path / "reports/registered.json").read_text())
    assert "champion" in registered["aliases"]
    assert (tmp_path / "dvc.lock").is_file()

    second = sh("dvc", "repro", cwd=tmp_path)
    assert "Running stage" not in second
    assert "up to date" in second

    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=tmp_path))
    assert "known_accuracy" in json.dumps(shown)
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=tmp_path))
    assert {"loss", "confusion", "roc"} <= set(plots["data"])
    assert not plots.get("errors")
