"""Scan a `known/<class>/` + `unknown/` image tree into a clean, deduplicated table.

Every file found is either a record or an entry in `skipped`/`duplicates`/`conflicts`, so a
user can always see why an image is not being trained on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from opensig.io import atomic_write

log = logging.getLogger(__name__)

UNKNOWN_LABEL = "unknown"
RECORD_COLUMNS = ["path", "hash", "label", "source", "width", "height"]


@dataclass
class ScanResult:
    """Usable images plus everything that was left out, and why."""

    records: pd.DataFrame
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    reused: int = 0  # files whose earlier probe was reused (same path, size and mtime)


@dataclass(frozen=True)
class _Candidate:
    path: str
    label: str
    source: str


@dataclass(frozen=True)
class _Probe:
    """Outcome of opening one file: a hash and size, or the reason it is unusable."""

    hash: str | None = None
    width: int = 0
    height: int = 0
    reason: str | None = None


PROBE_COLUMNS = ["path", "stat", "hash", "width", "height", "reason"]


def _stat(path: str) -> str:
    """Size and modification time: git's and DVC's test for 'this file did not change'."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def _load_probes(cache: Path | None) -> dict[tuple[str, str], _Probe]:
    if cache is None or not cache.is_file():
        return {}
    try:
        frame = pd.read_parquet(cache, columns=PROBE_COLUMNS)
    except Exception as err:  # a damaged cache costs a full scan, never a wrong answer
        log.warning("ignoring the scan cache %s (%s): probing every file", cache, err)
        return {}
    frame = frame.astype(object).where(frame.notna(), None)
    return {
        (r.path, r.stat): _Probe(r.hash, int(r.width), int(r.height), r.reason)
        for r in frame.itertuples(index=False)
    }


def _save_probes(cache: Path, keys: list[tuple[str, str]], probes: list[_Probe]) -> None:
    rows = [
        {
            "path": p,
            "stat": st,
            "hash": pr.hash,
            "width": pr.width,
            "height": pr.height,
            "reason": pr.reason,
        }
        for (p, st), pr in zip(keys, probes, strict=True)
    ]
    frame = pd.DataFrame(rows, columns=PROBE_COLUMNS)
    atomic_write(cache, lambda tmp: frame.to_parquet(tmp, index=False))


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _files_under(folder: Path) -> list[Path]:
    # Everything that is not a folder, so broken links and the like get reported, not lost.
    return [p for p in folder.rglob("*") if not p.is_dir()]


def _probe(path: str) -> _Probe:
    """Hash the bytes and fully decode them, so truncated files fail here, not in training."""
    if not Path(path).is_file():
        return _Probe(reason="not a regular file")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return _Probe(reason=f"unreadable: {exc}")
    if not data:
        return _Probe(reason="empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except UnidentifiedImageError:
        return _Probe(reason="not an image Pillow can open")
    # Pillow's decoders raise many exception types on corrupt data (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError, ...); any of them means "unusable".
    except Exception as exc:
        return _Probe(reason=f"unreadable: {type(exc).__name__}: {exc}")
    if width == 0 or height == 0:
        return _Probe(reason=f"image has zero size ({width}x{height})")
    return _Probe(hash=hashlib.sha256(data).hexdigest(), width=width, height=height)


def _list_candidates(root: Path) -> tuple[list[str], list[_Candidate], list[dict]]:
    """Find class folders and every file under known/ and unknown/, in sorted path order."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist: create it with known/<class>/ and unknown/ "
            "sub-folders, or point the config at the right folder"
        )
    known = root / "known"
    if not known.is_dir():
        raise FileNotFoundError(
            f"{known} does not exist: put the images of each known class in {known}/<class>/"
        )

    skipped: list[dict] = []
    candidates: list[_Candidate] = []
    classes: list[str] = []
    for entry in sorted(known.iterdir()):
        if entry.name.startswith("."):
            for f in _files_under(entry) if entry.is_dir() else [entry]:
                skipped.append({"path": f.as_posix(), "reason": "hidden file"})
        elif not entry.is_dir():
            skipped.append(
                {"path": entry.as_posix(), "reason": "not inside a class folder under known/"}
            )
        elif entry.is_dir():
            classes.append(entry.name)
    if not classes:
        raise ValueError(
            f"{known} has no class folders: put the images of each class in {known}/<class>/"
        )
    if UNKNOWN_LABEL in classes:
        raise ValueError(
            f"{known / UNKNOWN_LABEL} is not allowed: '{UNKNOWN_LABEL}' is reserved for images "
            f"of none of the classes; move those to {root / UNKNOWN_LABEL}/ instead"
        )

    for name in classes:
        for f in _files_under(known / name):
            candidates.append(_Candidate(f.as_posix(), name, name))

    unknown = root / UNKNOWN_LABEL
    if unknown.is_dir():
        for f in _files_under(unknown):
            relative = f.relative_to(unknown)
            source = relative.parts[0] if len(relative.parts) > 1 else UNKNOWN_LABEL
            candidates.append(_Candidate(f.as_posix(), UNKNOWN_LABEL, source))
    else:
        log.info("%s does not exist: scanning known classes only", unknown)

    visible: list[_Candidate] = []
    for c in candidates:
        top = known / c.label if c.label != UNKNOWN_LABEL else unknown
        if _is_hidden(Path(c.path).relative_to(top)):
            skipped.append({"path": c.path, "reason": "hidden file"})
        else:
            visible.append(c)
    visible.sort(key=lambda c: c.path)
    return classes, visible, skipped


def scan_folder(root: Path, workers: int | None = None, cache: Path | None = None) -> ScanResult:
    """Open and hash every image under `root/known/<class>/` and `root/unknown/`.

    Exact duplicates under one label keep their first copy by sorted path; images whose bytes
    appear under different labels are dropped entirely, since contradictory labels cannot be
    trained on. Record paths are `root` joined with the path below it, in POSIX form.
    Files are probed on every core (threads: decoding and hashing release the GIL). With
    ``cache``, a file whose path, size and mtime match the last scan is not read again.
    """
    root = Path(root)
    classes, candidates, skipped = _list_candidates(root)

    known = _load_probes(cache)
    keys = [(c.path, _stat(c.path)) for c in candidates]
    todo = [key[0] for key in keys if key not in known]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        fresh = dict(
            zip(
                todo,
                tqdm(
                    pool.map(_probe, todo),
                    total=len(todo),
                    desc=f"scanning {root}",
                    unit="file",
                    disable=None,
                ),
                strict=True,
            )
        )
    probes = [known[key] if key in known else fresh[key[0]] for key in keys]
    if cache is not None:
        _save_probes(cache, keys, probes)

    by_hash: dict[str, list[tuple[_Candidate, _Probe]]] = defaultdict(list)
    for cand, probe in zip(candidates, probes, strict=True):
        if probe.reason is not None:
            skipped.append({"path": cand.path, "reason": probe.reason})
        else:
            by_hash[probe.hash].append((cand, probe))

    rows: list[dict] = []
    duplicates: list[dict] = []
    conflicts: list[dict] = []
    for digest, copies in by_hash.items():
        labels = [cand.label for cand, _ in copies]
        if len(set(labels)) > 1:
            paths = [cand.path for cand, _ in copies]
            conflicts.append({"hash": digest, "paths": paths, "labels": labels})
            log.warning(
                "same image under different labels %s, excluded from the data: %s",
                sorted(set(labels)),
                ", ".join(paths),
            )
            continue
        (first, probe), *rest = copies
        rows.append(
            {
                "path": first.path,
                "hash": digest,
                "label": first.label,
                "source": first.source,
                "width": probe.width,
                "height": probe.height,
            }
        )
        duplicates.extend(
            {"path": cand.path, "duplicate_of": first.path, "label": cand.label} for cand, _ in rest
        )

    records = pd.DataFrame(rows, columns=RECORD_COLUMNS).sort_values("path", ignore_index=True)
    records = records.astype({"width": "int64", "height": "int64"})
    skipped.sort(key=lambda s: s["path"])
    duplicates.sort(key=lambda d: d["path"])
    conflicts.sort(key=lambda c: c["paths"][0])

    counts = records["label"].value_counts()
    empty = [name for name in classes if counts.get(name, 0) == 0]
    if empty:
        folders = [(root / "known" / name).as_posix() for name in empty]
        left_out = [f"{s['path']} ({s['reason']})" for s in skipped]
        left_out += [f"{p} (conflicting labels)" for c in conflicts for p in c["paths"]]
        examples = [x for x in left_out if x.startswith(tuple(f + "/" for f in folders))]
        raise ValueError(
            f"class folder(s) with no usable images: {', '.join(folders)}; add readable images "
            "or remove the folder. Files left out there: " + ("; ".join(examples[:5]) or "none")
        )

    for s in skipped:
        log.debug("skipped %s: %s", s["path"], s["reason"])
    if skipped:
        log.warning("skipped %d file(s) that are not usable images", len(skipped))
    if duplicates:
        log.info("ignored %d exact duplicate(s)", len(duplicates))
    log.info(
        "scanned %s: %d images, %d classes, %d unknown (%d files read, %d unchanged)",
        root,
        len(records),
        len(classes),
        int(counts.get(UNKNOWN_LABEL, 0)),
        len(todo),
        len(candidates) - len(todo),
    )
    return ScanResult(
        records=records,
        classes=classes,
        reused=len(candidates) - len(todo),
        skipped=skipped,
        duplicates=duplicates,
        conflicts=conflicts,
    )
