"""scan_folder on a real file tree with every kind of file a user's folder may hold."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opensig.data.scan import scan_folder
from opensig.labels import UNKNOWN_LABEL


def _save(path: Path, seed: int, fmt: str, size: tuple[int, int] = (16, 12)) -> bytes:
    """Write a distinct RGB noise image and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    k, u = root / "known", root / "unknown"
    png = _save(k / "cat/a.png", 1, "PNG")
    _write(k / "cat/a_copy.png", png)  # exact duplicate, same label
    _save(k / "cat/sub/deeper/b.jpg", 2, "JPEG", size=(20, 10))  # nested
    _save(k / "cat/c.gif", 3, "GIF")
    _save(k / "dog/d.bmp", 4, "BMP")
    _write(k / "dog/empty.png", b"")
    _write(k / "dog/notes.jpg", b"this is text, not a JPEG\n")
    big = _save(k / "dog/full.png", 5, "PNG", size=(64, 64))
    _write(k / "dog/truncated.png", big[: len(big) // 2])
    (k / "dog/full.png").unlink()
    _write(k / "dog/.DS_Store", b"\0\0\0\1Bud1")
    same = _save(k / "dog/e.png", 6, "PNG")
    _write(u / "street/e_again.png", same)  # conflict: known dog vs unknown
    _save(u / "street/g.png", 7, "PNG")
    _save(u / "street/night/h.png", 8, "PNG")  # source is the first-level folder only
    _save(u / "f.png", 9, "PNG")  # directly in unknown/: source "unknown"
    _save(u / ".thumbs/t.png", 10, "PNG")  # inside a hidden folder
    return root


def test_records_labels_sources_and_sizes(tree: Path) -> None:
    result = scan_folder(tree)
    base = tree.as_posix()
    rows = {r.path: r for r in result.records.itertuples()}
    assert list(result.records.columns) == ["path", "hash", "label", "source", "width", "height"]
    assert sorted(rows) == [
        f"{base}/known/cat/a.png",
        f"{base}/known/cat/c.gif",
        f"{base}/known/cat/sub/deeper/b.jpg",
        f"{base}/known/dog/d.bmp",
        f"{base}/unknown/f.png",
        f"{base}/unknown/street/g.png",
        f"{base}/unknown/street/night/h.png",
    ]
    assert list(result.records["path"]) == sorted(rows)
    assert result.classes == ["cat", "dog"]
    b = rows[f"{base}/known/cat/sub/deeper/b.jpg"]
    assert (b.label, b.source, b.width, b.height) == ("cat", "cat", 20, 10)
    h = rows[f"{base}/unknown/street/night/h.png"]
    assert (h.label, h.source) == (UNKNOWN_LABEL, "street")
    f = rows[f"{base}/unknown/f.png"]
    assert (f.label, f.source) == (UNKNOWN_LABEL, "unknown")
    a_bytes = (tree / "known/cat/a.png").read_bytes()
    assert rows[f"{base}/known/cat/a.png"].hash == hashlib.sha256(a_bytes).hexdigest()


def test_skipped_files_are_reported_with_reasons(tree: Path) -> None:
    skipped = {Path(s["path"]).name: s["reason"] for s in scan_folder(tree).skipped}
    assert set(skipped) == {"empty.png", "notes.jpg", "truncated.png", ".DS_Store", "t.png"}
    assert skipped["empty.png"] == "empty file"
    assert skipped["notes.jpg"] == "not an image, or a format Pillow cannot read"
    assert skipped["truncated.png"].startswith("unreadable: ")
    assert skipped[".DS_Store"] == skipped["t.png"] == "hidden file"


def test_duplicates_keep_first_path(tree: Path) -> None:
    base = tree.as_posix()
    assert scan_folder(tree).duplicates == [
        {
            "path": f"{base}/known/cat/a_copy.png",
            "duplicate_of": f"{base}/known/cat/a.png",
            "label": "cat",
        }
    ]


def test_conflicting_labels_exclude_every_copy(tree: Path, caplog) -> None:
    result = scan_folder(tree)
    base = tree.as_posix()
    paths = [f"{base}/known/dog/e.png", f"{base}/unknown/street/e_again.png"]
    digest = hashlib.sha256((tree / "known/dog/e.png").read_bytes()).hexdigest()
    assert result.conflicts == [{"hash": digest, "paths": paths, "labels": ["dog", "unknown"]}]
    assert not set(paths) & set(result.records["path"])
    assert digest not in set(result.records["hash"])
    assert any("different labels" in r.message for r in caplog.records)


def test_conflict_between_two_known_classes(tmp_path: Path) -> None:
    data = _save(tmp_path / "known/cat/x.png", 1, "PNG")
    _write(tmp_path / "known/dog/y.png", data)
    _save(tmp_path / "known/cat/ok.png", 2, "PNG")
    _save(tmp_path / "known/dog/ok.png", 3, "PNG")
    result = scan_folder(tmp_path)
    assert [c["labels"] for c in result.conflicts] == [["cat", "dog"]]
    assert sorted(result.records["label"]) == ["cat", "dog"]


def test_relative_root_gives_relative_paths(tree: Path, monkeypatch) -> None:
    monkeypatch.chdir(tree.parent)
    paths = scan_folder(Path("data")).records["path"]
    assert "data/known/cat/a.png" in set(paths)
    assert all(p.startswith("data/") for p in paths)


def test_rescan_reuses_unchanged_files_and_rereads_changed_ones(tree: Path) -> None:
    cache = tree.parent / "cache" / "scan.parquet"
    first = scan_folder(tree, cache=cache)
    again = scan_folder(tree, cache=cache)
    files = len(first.records) + len(first.skipped) + len(first.duplicates)
    files += sum(len(c["paths"]) for c in first.conflicts)
    hidden = sum(1 for s in first.skipped if s["reason"] == "hidden file")  # never probed
    assert first.reused == 0 and again.reused == files - hidden
    assert again.records.equals(first.records) and again.skipped == first.skipped
    assert (again.duplicates, again.conflicts) == (first.duplicates, first.conflicts)

    # A changed file is read again (new size/mtime); a fixed one becomes a record.
    _save(tree / "known/dog/empty.png", 11, "PNG")
    fixed = scan_folder(tree, cache=cache)
    assert fixed.reused == again.reused - 1
    assert "empty.png" in " ".join(fixed.records["path"])
    assert fixed.records.equals(scan_folder(tree).records)  # same as without a cache

    cache.write_bytes(b"not parquet")  # a damaged cache costs a full scan, not a wrong one
    assert scan_folder(tree, cache=cache).records.equals(fixed.records)


def test_scan_is_deterministic_across_worker_counts(tree: Path) -> None:
    one, many = scan_folder(tree, workers=1), scan_folder(tree, workers=8)
    assert one.records.equals(many.records)
    assert (one.skipped, one.duplicates, one.conflicts) == (
        many.skipped,
        many.duplicates,
        many.conflicts,
    )


def test_unknown_folder_is_optional(tmp_path: Path) -> None:
    _save(tmp_path / "known/cat/a.png", 1, "PNG")
    assert list(scan_folder(tmp_path).records["label"]) == ["cat"]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_folder(tmp_path / "nope")


def test_missing_known(tmp_path: Path) -> None:
    _save(tmp_path / "unknown/a.png", 1, "PNG")
    with pytest.raises(FileNotFoundError, match="known"):
        scan_folder(tmp_path)


def test_known_without_class_folders(tmp_path: Path) -> None:
    _save(tmp_path / "known/loose.png", 1, "PNG")
    with pytest.raises(ValueError, match="no class folders"):
        scan_folder(tmp_path)


def test_class_named_unknown_is_reserved(tmp_path: Path) -> None:
    _save(tmp_path / "known/cat/a.png", 1, "PNG")
    _save(tmp_path / "known/unknown/b.png", 2, "PNG")
    with pytest.raises(ValueError, match="reserved"):
        scan_folder(tmp_path)


def test_class_without_usable_images_names_the_folder(tmp_path: Path) -> None:
    _save(tmp_path / "known/cat/a.png", 1, "PNG")
    _write(tmp_path / "known/dog/broken.png", b"")
    with pytest.raises(ValueError, match=r"known/dog.*broken\.png \(empty file\)"):
        scan_folder(tmp_path)


def test_loose_file_in_known_is_reported(tmp_path: Path) -> None:
    _save(tmp_path / "known/cat/a.png", 1, "PNG")
    _save(tmp_path / "known/loose.png", 2, "PNG")
    skipped = scan_folder(tmp_path).skipped
    assert skipped == [
        {
            "path": (tmp_path / "known/loose.png").as_posix(),
            "reason": "not inside a class folder under known/",
        }
    ]
