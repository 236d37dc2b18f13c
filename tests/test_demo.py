"""Demo writers: real PNGs, right folders, identical bytes on every run."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from opensig.data.demo import (
    DIGITS_HOLDOUT,
    FASHION_DIR,
    FASHION_HOLDOUT,
    write_demo,
    write_digits,
    write_fashion_mnist,
)
from opensig.data.scan import scan_folder
from opensig.data.split import assign_splits


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("digits")
    return out, write_digits(out)


def test_digits_counts_and_folders(digits_dir) -> None:
    out, counts = digits_dir
    per_digit = np.bincount(load_digits().target)
    expected = {f"{'known' if d < 6 else 'unknown'}/{d}": int(n) for d, n in enumerate(per_digit)}
    assert counts == expected
    assert sum(counts.values()) == 1797
    on_disk = {}
    for name in _files(out):
        folder = name.rsplit("/", 1)[0]
        on_disk[folder] = on_disk.get(folder, 0) + 1
    assert on_disk == expected


def test_digits_pixels_are_scaled_and_upscaled(digits_dir) -> None:
    out, _ = digits_dir
    digits = load_digits()
    assert digits.target[0] == 0
    with Image.open(out / "known/0/digit_0000.png") as im:
        assert (im.mode, im.size, im.format) == ("L", (32, 32), "PNG")
        pixels = np.asarray(im)
    expected = np.rint(digits.images[0] * 255 / 16).astype(np.uint8)
    assert np.array_equal(pixels, np.kron(expected, np.ones((4, 4), dtype=np.uint8)))


def test_digits_are_byte_for_byte_deterministic(digits_dir, tmp_path: Path) -> None:
    out, _ = digits_dir
    write_digits(tmp_path)
    first = _files(out)
    assert _files(tmp_path) == first
    write_digits(tmp_path)  # rewriting in place changes nothing either
    assert _files(tmp_path) == first


def test_digits_scan_and_split_with_holdout(digits_dir) -> None:
    out, counts = digits_dir
    scan = scan_folder(out)
    assert scan.classes == ["0", "1", "2", "3", "4", "5"]
    assert scan.skipped == []
    usable = 1797 - len(scan.duplicates) - sum(len(c["paths"]) for c in scan.conflicts)
    assert len(scan.records) == usable
    df = assign_splits(scan.records, 0.15, 0.15, DIGITS_HOLDOUT)
    novel = df[df["novel"]]
    assert set(novel["source"]) == set(DIGITS_HOLDOUT)
    assert (novel["split"] == "test").all()
    assert len(novel) <= counts["unknown/8"] + counts["unknown/9"]


def _write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if gzipped else data)


def test_fashion_writer_on_small_idx_files(tmp_path: Path) -> None:
    """Train file first, then test, in file order; gzipped and raw IDX files both read."""
    idx = tmp_path / "idx"
    idx.mkdir()
    train_labels = np.array([9, 0, 0, 6, 0, 9], dtype=np.uint8)
    test_labels = np.array([9, 6, 1, 1], dtype=np.uint8)
    train = np.arange(6 * 28 * 28).reshape(6, 28, 28) % 251
    test = (np.arange(4 * 28 * 28).reshape(4, 28, 28) * 7) % 253
    _write_idx(idx / "train-images-idx3-ubyte.gz", train, gzipped=True)
    _write_idx(idx / "train-labels-idx1-ubyte.gz", train_labels, gzipped=True)
    _write_idx(idx / "t10k-images-idx3-ubyte", test, gzipped=False)
    _write_idx(idx / "t10k-labels-idx1-ubyte", test_labels, gzipped=False)

    out = tmp_path / "out"
    counts = write_fashion_mnist(out, idx_dir=idx, per_class=2)
    assert counts == {
        "known/trouser": 2,
        "known/tshirt_top": 2,
        "unknown/ankle_boot": 2,
        "unknown/shirt": 2,
    }
    assert sorted(_files(out)) == [
        "known/trouser/test_00002.png",
        "known/trouser/test_00003.png",
        "known/tshirt_top/train_00001.png",
        "known/tshirt_top/train_00002.png",
        "unknown/ankle_boot/train_00000.png",
        "unknown/ankle_boot/train_00005.png",
        "unknown/shirt/test_00001.png",
        "unknown/shirt/train_00003.png",
    ]
    with Image.open(out / "unknown/shirt/test_00001.png") as im:
        assert np.array_equal(np.asarray(im), test[1].astype(np.uint8))


def test_demo_data_refuses_to_merge_into_other_data(tmp_path: Path, digits_dir) -> None:
    """`opensig demo-data`: a rerun refills; another demo or other files stop it before
    anything changes; --force replaces the folder whole."""
    from functools import partial

    digits = _files(digits_dir[0])
    idx = tmp_path / "idx"
    idx.mkdir()
    _write_idx(idx / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), gzipped=False)
    _write_idx(idx / "train-labels-idx1-ubyte", np.array([0, 8], np.uint8), gzipped=False)
    _write_idx(idx / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), gzipped=False)
    _write_idx(idx / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8), gzipped=False)
    fashion = partial(write_fashion_mnist, idx_dir=idx, per_class=1)
    out = tmp_path / "data"

    assert write_demo(write_digits, out) == digits_dir[1]
    assert write_demo(write_digits, out) == digits_dir[1] and _files(out) == digits  # a rerun
    with pytest.raises(ValueError, match=r"data holds 1797 file\(s\) this demo does not .*--force"):
        write_demo(fashion, out)
    assert _files(out) == digits  # nothing changed
    (out / "known/0/mine.png").write_bytes(b"a user's own image")
    with pytest.raises(ValueError, match=r"e\.g\. .*known/0/mine\.png"):
        write_demo(write_digits, out)
    assert write_demo(fashion, out, force=True) == {"known/tshirt_top": 1, "unknown/bag": 1}
    assert sorted(_files(out)) == [
        "known/tshirt_top/train_00000.png",
        "unknown/bag/train_00001.png",
    ]
    assert not list(tmp_path.glob(".data.demo-*"))  # no staging folder left


def test_fashion_writer_reports_missing_data(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        write_fashion_mnist(tmp_path / "out", idx_dir=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        write_fashion_mnist(tmp_path / "out", idx_dir=tmp_path / "empty")


def test_fashion_writer_on_installed_data(tmp_path: Path) -> None:
    if not FASHION_DIR.is_dir():
        pytest.skip(f"{FASHION_DIR} absent: apt-get install dataset-fashion-mnist to run this")
    counts = write_fashion_mnist(tmp_path, per_class=3)
    assert len(counts) == 10
    assert set(counts.values()) == {3}
    assert {k.split("/")[1] for k in counts if k.startswith("unknown/")} >= set(FASHION_HOLDOUT)
    # the first training images are labelled ankle boot, T-shirt, T-shirt, dress, T-shirt
    assert (tmp_path / "unknown/ankle_boot/train_00000.png").is_file()
    tshirts = sorted(p.name for p in (tmp_path / "known/tshirt_top").iterdir())
    assert tshirts == ["train_00001.png", "train_00002.png", "train_00004.png"]
    with Image.open(tmp_path / "known/dress/train_00003.png") as im:
        assert (im.mode, im.size) == ("L", (28, 28))
    assert _files(tmp_path) == _files(_rewrite(tmp_path.parent / "again"))


def _rewrite(out: Path) -> Path:
    write_fashion_mnist(out, per_class=3)
    return out
