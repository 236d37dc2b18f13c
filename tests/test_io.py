"""Tests for atomic writes and JSON helpers (opensig.io)."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

from opensig.io import (
    atomic_write,
    inside,
    link_or_copy,
    read_json,
    signals_deferred,
    write_json,
)


def _strict_loads(text: str) -> object:
    """json.loads that rejects NaN/Infinity, as strict JSON readers do."""

    def reject(token: str) -> float:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def test_write_json_nan_as_null(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    obj = {
        "nan": math.nan,
        "inf": [1.0, math.inf, -math.inf],
        "np_nan": np.float32("nan"),
        "np_int": np.int64(3),
        "nested": {"x": (0.5, float("nan"))},
        "path": Path("a") / "b.png",
        1: "key",
    }
    assert write_json(path, obj) == path
    data = _strict_loads(path.read_text())
    assert data == {
        "nan": None,
        "inf": [1.0, None, None],
        "np_nan": None,
        "np_int": 3,
        "nested": {"x": [0.5, None]},
        "path": "a/b.png",
        "1": "key",
    }
    assert read_json(path) == data


def test_write_json_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.json"
    write_json(path, [1, 2])
    assert read_json(path) == [1, 2]


def test_atomic_write_replaces(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    seen: list[Path] = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("half-writ")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, writer)
    assert path.read_text() == "old"
    assert seen and seen[0] != path and seen[0].parent == path.parent
    assert not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_failure_without_old_file(tmp_path: Path) -> None:
    path = tmp_path / "new.txt"

    def writer(tmp: Path) -> None:
        tmp.write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, writer)
    assert list(tmp_path.iterdir()) == []


def test_read_json_missing_names_path(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "metrics.json"
    with pytest.raises(FileNotFoundError) as info:
        read_json(path)
    assert str(path) in str(info.value)


def test_atomic_write_gives_the_usual_file_mode(tmp_path: Path) -> None:
    """mkstemp creates 0600 files; outputs must be readable like any file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    path = atomic_write(tmp_path / "out.json", lambda tmp: tmp.write_text("{}"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask != 0o600


class Stopped(Exception):
    pass


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def test_signal_in_a_deferred_block_arrives_after_it() -> None:
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    steps = []
    try:
        with pytest.raises(Stopped):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("saved")  # still runs: the signal waits for the block to end
                steps.append("recorded")
            steps.append("after")  # never runs: the held signal is delivered on exit
        assert steps == ["saved", "recorded"]
        assert signal.getsignal(signal.SIGTERM) is _raise_stopped  # handler restored
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_deferred_block_without_a_signal_changes_nothing() -> None:
    before = signal.getsignal(signal.SIGINT)
    with signals_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is before


def test_link_or_copy_links_where_it_can(tmp_path: Path) -> None:
    source = tmp_path / "state" / "weights-0003.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    target = tmp_path / "model" / "weights.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"older weights")
    link_or_copy(source, target)
    assert target.read_bytes() == b"weights"
    assert target.stat().st_ino == source.stat().st_ino  # no byte written twice
    source.unlink()  # the checkpoint goes; the model stays
    assert target.read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.safetensors"]


def test_link_or_copy_copies_across_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_bytes(b"weights")
    link_or_copy(source, target)
    assert target.read_bytes() == b"weights"
    assert target.stat().st_ino != source.stat().st_ino


def test_inside_reads_the_normalised_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert inside("data/known/../known/a.png", "data") == Path("known/a.png")
    assert inside("data", "data") == Path(".")
    assert inside(tmp_path / "data/x.png", "data") == Path("x.png")  # absolute and relative
    assert inside("data/../secret.txt", "data") is None
    assert inside("data2/x.png", "data") is None  # a shared prefix is not a parent folder
    assert inside("/etc/passwd", "data") is None


def test_inside_follows_links_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root/link").symlink_to(tmp_path / "outside")
    assert inside(tmp_path / "root/link/x", tmp_path / "root") == Path("link/x")
    assert inside(tmp_path / "root/link/x", tmp_path / "root", follow_links=True) is None
    assert inside(tmp_path / "outside", tmp_path / "root/link", follow_links=True) == Path(".")
