"""Write the demo data sets as a `known/` + `unknown/` PNG tree that `scan_folder` reads.

The writers overwrite files of the same name and leave any other file in `out` alone;
`write_demo` (what `opensig demo-data` runs) refuses a folder holding anything else, so a
demo never merges into other data (the digits and Fashion-MNIST as twelve classes).

Files are byte-for-byte reproducible, so `dvc add` gives the same hash on every machine:
PNGs are written uncompressed (zlib level 0, i.e. stored deflate blocks), because compressed
output differs between zlib builds (Pillow's wheels switched to zlib-ng), and Pillow adds no
metadata or timestamps unless asked to.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from opensig.labels import LABEL_SEP, UNKNOWN_LABEL

log = logging.getLogger(__name__)

DIGITS_CLASSES = tuple(str(d) for d in range(10))
DIGITS_KNOWN = DIGITS_CLASSES[:6]
DIGITS_HOLDOUT = ("8", "9")

# Debian's dataset-fashion-mnist; $OPENSIG_FASHION_MNIST points elsewhere (a copied folder)
FASHION_DIR = Path(os.environ.get("OPENSIG_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
# Folder per Fashion-MNIST label 0..9; labels 0..5 are known, 6..9 become unknown sources.
FASHION_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FASHION_KNOWN = FASHION_CLASSES[:6]
FASHION_HOLDOUT = ("bag", "ankle_boot")

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(pixels))


def write_digits(out: Path, known: Sequence[str] = DIGITS_KNOWN) -> dict[str, int]:
    """Write scikit-learn's bundled 8x8 digits (1797 images) as 32x32 PNGs under `out`.

    Digits 0..5 are the known classes (or ``known``); the others go to `unknown/<digit>/`, so
    each digit is an unknown source: train on 6 and 7, hold out 8 and 9
    (`holdout_unknown: ["8", "9"]`).
    Returns the number of images per folder, e.g. {"known/0": 178, ..., "unknown/9": 180}.
    """
    from sklearn.datasets import load_digits  # heavy import, only needed here

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    counts: Counter[str] = Counter()
    for index, (image, target) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = f"known/{target}" if str(target) in known else f"{UNKNOWN_LABEL}/{target}"
        big = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.NEAREST))
        _write_png(Path(out) / folder / f"digit_{index:04d}.png", big)
        counts[folder] += 1
    log.info("wrote %d digit images to %s", sum(counts.values()), out)
    return dict(sorted(counts.items()))


def write_digit_pairs(out: Path, n: int = 1500, seed: int = 0) -> dict[str, int]:
    """A multi-label demo: two of scikit-learn's digits side by side (32x64 PNGs).

    An image's labels are the known digits (0..5) in it: ``2|4``, or ``3`` when the other
    digit is 6..9, or none (an unknown image) when both are. Writes ``out/pairs/*.png`` and
    ``out/labels.csv`` (``path,labels``); point ``data.labels_csv`` at the latter.
    """
    from sklearn.datasets import load_digits  # heavy import, only needed here

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    rows, counts = [], Counter()
    for index, (a, b) in enumerate(rng.integers(0, len(pixels), size=(n, 2))):
        pair = np.hstack([pixels[a], pixels[b]])
        big = np.asarray(Image.fromarray(pair).resize((64, 32), Image.Resampling.NEAREST))
        name = f"pairs/pair_{index:04d}.png"
        _write_png(Path(out) / name, big)
        known = sorted({str(digits.target[i]) for i in (a, b)} & set(DIGITS_KNOWN))
        rows.append(f"{name},{LABEL_SEP.join(map(str, known))}")
        counts[(UNKNOWN_LABEL, "single", "multi")[len(known)]] += 1
    (Path(out) / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    log.info("wrote %d digit pairs to %s: %s", n, out, dict(counts))
    return dict(sorted(counts.items()))


def write_demo(
    write: Callable[[Path], dict[str, int]], out: Path, force: bool = False
) -> dict[str, int]:
    """``write`` a demo set into ``out``, through a folder beside it: a missing or empty
    ``out``, or one holding only files this demo writes (a rerun), is filled; any other
    file there stops it before ``out`` changes. ``force`` replaces ``out`` whole."""
    out = Path(out)
    staging = out.parent / f".{out.name}.demo-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        counts = write(staging)
        if out.exists() and not force:
            ours = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
            foreign = sorted(
                p.relative_to(out)
                for p in out.rglob("*")
                if p.is_file() and p.relative_to(out) not in ours
            )
            if foreign:
                raise ValueError(
                    f"{out} holds {len(foreign)} file(s) this demo does not write (e.g. "
                    f"{out / foreign[0]}): pass another --out, or --force to replace {out} "
                    "whole (with `dvc add` done before, DVC's cache keeps the old data)"
                )
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not: magic 0 0 <dtype> <ndim>, then
    ndim big-endian uint32 sizes, then the data in C order."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header implies {expected} bytes for shape {shape}, file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find_idx(idx_dir: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (idx_dir / name).is_file():
            return idx_dir / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {idx_dir}: install it with "
        "`apt-get install dataset-fashion-mnist`, or pass the folder holding the IDX files"
    )


def write_fashion_mnist(
    out: Path,
    idx_dir: Path = FASHION_DIR,
    per_class: int | None = 1000,
    parts: Sequence[str] = ("train", "test"),
    classes: Sequence[str] = FASHION_CLASSES,
    known: Sequence[str] = FASHION_KNOWN,
) -> dict[str, int]:
    """Write Fashion-MNIST as 28x28 PNGs under `out`, `per_class` images of each class.

    Takes the first `per_class` images of each class from the train file, then the test file,
    in file order (None: all 7000). Known: tshirt_top, trouser, pullover, dress, coat, sandal;
    unknown sources: shirt and sneaker (trained on), bag and ankle_boot (to hold out). Files
    are named `<train|test>_<index in that file:05d>.png`. Returns the images per folder.
    `parts` and `classes` select official files and classes (the open-set benchmark writes
    the official train and test sets to separate folders); ``known`` which classes are
    known, the others being unknown sources (the benchmark's random class splits).
    """
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be a positive number or None, got {per_class}")
    idx_dir = Path(idx_dir)
    if not idx_dir.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {idx_dir} does not exist: install it with "
            "`apt-get install dataset-fashion-mnist`, or pass the folder holding the IDX files"
        )
    counts: Counter[str] = Counter()
    for part, prefix in (("train", "train"), ("test", "t10k")):
        if part not in parts:
            continue
        images = _read_idx(_find_idx(idx_dir, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(idx_dir, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{idx_dir}: {part} images {images.shape} and labels {labels.shape} do not match"
            )
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = FASHION_CLASSES[label]
            if name not in classes:
                continue
            folder = f"known/{name}" if name in known else f"{UNKNOWN_LABEL}/{name}"
            if per_class is not None and counts[folder] >= per_class:
                continue
            _write_png(Path(out) / folder / f"{part}_{index:05d}.png", image)
            counts[folder] += 1
    log.info("wrote %d Fashion-MNIST images to %s", sum(counts.values()), out)
    return dict(sorted(counts.items()))
