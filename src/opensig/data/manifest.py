"""The manifest: one row per usable image (path, hash, label, source, split, novel).

Written by ingest, read by every later stage. It is the one place that knows the class
list before a model exists; afterwards the model's spec carries it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from opensig.io import atomic_write, inside
from opensig.labels import LABEL_SEP, UNKNOWN, UNKNOWN_LABEL

COLUMNS = ["path", "hash", "label", "source", "split", "novel"]


def write_manifest(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def read_manifest(path: Path, root: Path) -> pd.DataFrame:
    """The manifest at ``path``, after checking that every image path stays inside ``root``.

    A manifest is a file like any other: edited by hand, or copied from another project, a
    row like ``../../home/me/.ssh/id_rsa`` or ``/etc/passwd`` would make training read, and
    register upload, a file the user never put in the data. The check is on the normalised
    path (no ``..`` out, nothing absolute elsewhere), not on link targets: links inside the
    data folder are the user's own, and ingest has already followed them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found; run `opensig ingest` first")
    df = pd.read_parquet(path)
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(
            f"{path}: manifest lacks columns {sorted(missing)}; rerun `opensig ingest`"
        )
    outside = [p for p in df["path"] if inside(p, root) is None]
    if outside:
        raise ValueError(
            f"{path}: {len(outside)} image path(s) outside the data folder {root}, e.g. "
            f"{outside[0]!r}; the manifest was edited or made for another folder: rerun "
            "`opensig ingest`"
        )
    return df


def label_set(label: str) -> list[str]:
    """A manifest label -> its classes: ``"cat|dog"`` -> ["cat", "dog"], ``"unknown"`` -> []."""
    return [] if label == UNKNOWN_LABEL else label.split(LABEL_SEP)


def is_multi_label(labels: Iterable[str]) -> bool:
    """Does any image carry several classes (multi-label data, from a labels CSV)?"""
    return any(LABEL_SEP in label for label in labels)


def known_classes(df: pd.DataFrame) -> list[str]:
    """Sorted known class names: the order of the model's outputs."""
    return sorted({name for label in set(df["label"]) for name in label_set(label)})


def _check_known(names: set[str], classes: Sequence[str]) -> None:
    """A label the model was not trained on is an error rather than a silent 'unknown': the
    model and the manifest come from different data, and the pipeline must be rerun. (The
    promotion gate, which judges a champion of other classes on purpose, aligns the classes
    first: :func:`opensig.evaluation.align_classes`.)"""
    stray = sorted(names - set(classes) - {UNKNOWN_LABEL})
    if stray:
        raise ValueError(
            f"labels {stray} are not among the model's classes {list(classes)}: the model was "
            "trained on other data than this manifest; rerun the pipeline (dvc repro) so that "
            "train sees the current data"
        )


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Class names -> indices 0..K-1, ``unknown`` -> UNKNOWN (-1)."""
    _check_known(set(labels), classes)
    index = {name: i for i, name in enumerate(classes)}
    index[UNKNOWN_LABEL] = UNKNOWN
    return np.array([index[label] for label in labels], dtype=np.int64)


def multi_hot(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Labels -> (N, K) 0/1 targets, one 1 per class of the image; all-zero for unknown."""
    sets = [label_set(label) for label in labels]
    _check_known({name for names in sets for name in names}, classes)
    index = {name: i for i, name in enumerate(classes)}
    out = np.zeros((len(sets), len(classes)), dtype=np.int64)
    for row, names in enumerate(sets):
        out[row, [index[name] for name in names]] = 1
    return out


def label_targets(labels: Sequence[str], classes: Sequence[str], multi_label: bool) -> np.ndarray:
    """What training and tuning learn from: class indices (N,), or multi-hot (N, K) when the
    data set is multi-label (decided on the whole manifest, so every split agrees)."""
    labels = list(labels)
    return multi_hot(labels, classes) if multi_label else label_indices(labels, classes)


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    return df[df["split"] == split].reset_index(drop=True)
