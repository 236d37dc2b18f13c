"""Ingest from a labels CSV instead of class folders: the way to give an image several classes.

``path,labels`` rows: ``path`` relative to the data folder, ``labels`` the image's classes
separated by ``|`` (``cat|dog``), empty for an unknown image (none of the classes). The CSV
lists the data set: files under the data folder that it does not name are not used. Each
row ends up kept, skipped (with its reason), a duplicate or a conflict, as in folder mode.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from opensig.data.images import MAX_IMAGE_PIXELS
from opensig.data.scan import Candidate, Listing, ScanResult, like_unknown, scan_candidates
from opensig.io import inside
from opensig.labels import LABEL_SEP, UNKNOWN_LABEL

REQUIRED = ("path", "labels")


def read_labels_csv(path: Path) -> pd.DataFrame:
    """The CSV as strings (an empty ``labels`` cell stays ``""``), its columns checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.labels_csv: {path} not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; the header must be `path,labels` "
            f"(labels separated by '{LABEL_SEP}', empty for an unknown image)"
        )
    return table


def _row(root: Path, rel: str, labels: str) -> Candidate | str:
    """A candidate for one CSV row, or the reason it cannot be one."""
    if not rel.strip():
        return "empty path"
    below = inside(root / rel, root)
    if below is None:
        return f"outside the data folder {root}"
    names = sorted({name.strip() for name in labels.split(LABEL_SEP) if name.strip()})
    if any(like_unknown(name) for name in names):
        return f"'{UNKNOWN_LABEL}' is not a class: leave labels empty for an unknown image"
    parts = below.parts
    label = LABEL_SEP.join(names) or UNKNOWN_LABEL
    source = label if names else (parts[0] if len(parts) > 1 else UNKNOWN_LABEL)
    return Candidate(Path(root, *parts).as_posix(), label, source)


def list_csv(root: Path, csv: Path) -> Listing:
    """Every row of the labels CSV as a candidate, or skipped with its reason."""
    table = read_labels_csv(csv)
    candidates: list[Candidate] = []
    skipped: list[dict] = []
    for rel, labels in zip(table["path"], table["labels"], strict=True):
        row = _row(Path(root), rel, labels)
        if isinstance(row, str):
            skipped.append({"path": rel, "reason": f"{csv}: {row}", "label": labels})
        else:
            candidates.append(row)
    candidates.sort(key=lambda c: c.path)
    classes = sorted(
        {name for c in candidates if c.label != UNKNOWN_LABEL for name in c.label.split(LABEL_SEP)}
    )
    if not classes:
        raise ValueError(f"{csv}: no row names a class; fill the labels column (e.g. cat|dog)")
    where = {name: f"'{name}' (in {csv})" for name in classes}
    return Listing(classes, candidates, skipped, len(table), where)


def scan_csv(
    root: Path,
    csv: Path,
    workers: int | None = None,
    cache: Path | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> ScanResult:
    """Open and hash every image the labels CSV names; see :func:`scan_folder` for the rest."""
    return scan_candidates(Path(root), list_csv(Path(root), Path(csv)), workers, cache, max_pixels)
