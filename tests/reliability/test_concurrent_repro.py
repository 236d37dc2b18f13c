"""Two `dvc repro` at once: DVC's locks turn the second away; nothing is corrupted.

DVC holds its repository lock only while it reads the project, and a read/write lock on a
stage's files while the stage runs, so a second `dvc repro` started mid-stage fails on the
latter. The retraining flow recognises both messages and retries (`opensig.retrain`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from opensig.retrain import LOCK_BUSY
from tests.conftest import REPO, write_params

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture
def dvc_project(tmp_path: Path, digits_data: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    shutil.copytree(REPO / "src", root / "src")
    write_params(root)
    shutil.copytree(digits_data, root / "data")
    for args in (
        ("git", "init", "-q"),
        ("dvc", "init", "-q"),
        ("dvc", "add", "-q", "data"),
        ("git", "add", "-A"),
        ("git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "x"),
    ):
        assert _sh(*args, cwd=root).returncode == 0, args
    return root


def test_second_repro_is_turned_away_and_the_first_finishes_cleanly(dvc_project: Path) -> None:
    first = subprocess.Popen(
        ["dvc", "repro", "ingest"],
        cwd=dvc_project,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in first.stdout:  # wait until the first holds the lock and is running its stage
        lines.append(line)
        if "Running stage 'ingest'" in line:
            break
    assert first.poll() is None, "".join(lines)

    start = time.monotonic()
    second = _sh("dvc", "repro", "ingest", cwd=dvc_project)
    assert second.returncode != 0
    assert any(message in second.stderr for message in LOCK_BUSY), second.stderr
    assert time.monotonic() - start < 60
    # (the second failing on the lock is the proof they overlapped; the first may be done now)

    lines += first.stdout.readlines()
    assert first.wait(timeout=300) == 0, "".join(lines)
    manifest = pd.read_parquet(dvc_project / "artifacts" / "manifest.parquet")
    assert len(manifest) == 1797
    status = _sh("dvc", "status", "ingest", cwd=dvc_project)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    again = _sh("dvc", "repro", "ingest", cwd=dvc_project)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout, again.stdout
