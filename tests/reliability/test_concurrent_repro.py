"""Two `dvc repro` at once: DVC's locks turn the second away; nothing is corrupted.

DVC holds its repository lock only while it reads the project, and a read/write lock on a
stage's files while the stage runs, so a second `dvc repro` started mid-stage fails on the
latter. The retraining flow recognises both messages and retries (`opensig.retrain`).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from opensig.retrain import LOCK_BUSY
from tests.conftest import TOOLS_ENV, dvc_project, tool

pytestmark = pytest.mark.e2e


@pytest.fixture(name="dvc_project")
def a_dvc_project(tmp_path: Path, digits_data: Path) -> Path:
    return dvc_project(tmp_path / "project", digits_data)


def test_second_repro_is_turned_away_and_the_first_finishes_cleanly(dvc_project: Path) -> None:
    first = subprocess.Popen(
        ["dvc", "repro", "ingest"],
        cwd=dvc_project,
        env=TOOLS_ENV,
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
    second = tool("dvc", "repro", "ingest", cwd=dvc_project)
    assert second.returncode != 0
    assert any(message in second.stderr for message in LOCK_BUSY), second.stderr
    assert time.monotonic() - start < 60
    # (the second failing on the lock is the proof they overlapped; the first may be done now)

    lines += first.stdout.readlines()
    assert first.wait(timeout=300) == 0, "".join(lines)
    manifest = pd.read_parquet(dvc_project / "artifacts" / "manifest.parquet")
    assert len(manifest) == 1797
    status = tool("dvc", "status", "ingest", cwd=dvc_project)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    again = tool("dvc", "repro", "ingest", cwd=dvc_project)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout, again.stdout
