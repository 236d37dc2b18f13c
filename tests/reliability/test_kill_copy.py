"""A copy into data/ killed with SIGKILL leaves no partial file once the folder is written
again, and a `review import` killed mid-way, then rerun, holds each image once."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opensig.io import remove_dead_copies
from opensig.review import IMPORTED, read_imports
from tests.conftest import write_params


def _wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_copy_killed_mid_way_leaves_a_temp_file_that_the_next_writer_removes(
    tmp_path: Path,
) -> None:
    """copy_new of a 1 GB file (sparse here, written out whole by the copy): the process is
    killed as soon as its temp file appears, long before the copy ends."""
    source, folder = tmp_path / "big.png", tmp_path / "data" / "known" / "cat"
    with open(source, "wb") as f:
        f.truncate(1 << 30)
    code = (
        "import sys; from pathlib import Path; from opensig.io import copy_new; "
        "copy_new(Path(sys.argv[1]), Path(sys.argv[2]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(source), str(folder)])
    _wait_for(lambda: folder.is_dir() and any(folder.glob(".*.tmp")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (partial,) = folder.glob(".*.tmp")  # what a killed copy leaves
    assert partial.stat().st_size < source.stat().st_size
    alive = folder / f".other.png.{os.getpid()}.x.tmp"  # a live process's copy in progress
    alive.write_bytes(b"")
    assert remove_dead_copies(folder) == 1
    assert not partial.exists() and alive.exists()
    assert not (folder / "big.png").exists()  # never placed half-written


def test_review_import_killed_then_rerun_holds_each_image_once(
    tmp_path: Path, digits_data: Path
) -> None:
    data, batch = tmp_path / "data", tmp_path / "review" / "b1"
    shutil.copytree(digits_data / "known" / "0", data / "known" / "0")
    images = sorted((digits_data / "known" / "1").iterdir())
    labeled = batch / "labeled" / "1"
    labeled.mkdir(parents=True)
    for image in images:
        shutil.copy2(image, labeled / image.name)
    write_params(tmp_path)
    command = [str(Path(sys.executable).with_name("opensig")), "review", "import", str(batch)]
    target = data / "known" / "1"
    proc = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.DEVNULL)
    _wait_for(lambda: target.is_dir() and any(target.iterdir()))
    proc.send_signal(signal.SIGKILL)  # mid-import: some images copied, maybe one half-way
    proc.wait()
    assert not (batch / IMPORTED).exists()  # it never got to its report
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    placed = list(target.iterdir())
    assert not [p for p in placed if p.name.startswith(".")]  # no partial file left
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in placed)
    expected = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in images)
    assert digests == expected  # each image once
    (report,) = read_imports(batch)  # the killed import wrote no record
    statuses = {row["status"] for row in report["files"]}
    assert statuses <= {"added", "already in data"}
    assert sum(report["added"].values()) + sum(
        row["status"] == "already in data" for row in report["files"]
    ) == len(images)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the import announces nowhere
