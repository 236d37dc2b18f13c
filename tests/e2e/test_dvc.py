"""`dvc repro` in a temp git repo: the pipeline runs, and a rerun (via Prefect) does nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from pipelines.retrain import retrain
from tests.conftest import REPO, write_params

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def venv_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc` and the stages' `opensig` commands come from the interpreter's own venv."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def sh(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_dvc_repro_runs_all_stages_then_is_up_to_date(tmp_path: Path, digits_data: Path) -> None:
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    shutil.copytree(REPO / "src", tmp_path / "src")  # stages depend on the code they run
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
    lock = (tmp_path / "dvc.lock").read_text()

    # The second run goes through the Prefect flow: nothing changed, so nothing reruns.
    with prefect_test_harness():
        registration = retrain(str(tmp_path))
    assert registration == registered
    assert lock == (tmp_path / "dvc.lock").read_text()

    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=tmp_path))
    assert "known_accuracy" in json.dumps(shown)
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=tmp_path))
    assert {"loss", "confusion", "roc"} <= set(plots["data"])
    assert not plots.get("errors")
