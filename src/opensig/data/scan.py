"""Scan a `known/<class>/` + `unknown/` image tree into a clean, deduplicated table.

Every file found is either a record or an entry in `skipped`/`duplicates`/`conflicts`, so a
user can always see why an image is not being trained on.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import UnidentifiedImageError
from tqdm import tqdm

from opensig.data.images import DECODE_VERSION, MAX_IMAGE_PIXELS, ImageRejected, check
from opensig.io import atomic_write
from opensig.labels import LABEL_SEP, UNKNOWN_LABEL

log = logging.getLogger(__name__)

RECORD_COLUMNS = ["path", "hash", "label", "source", "width", "height"]
SCAN_CACHE = "scan.parquet"  # the probe cache's file name, in data.cache_dir


def scan_cache(cache_dir: Path) -> Path:
    """The probe cache in ``cache_dir``: ingest and review share it, so each file is read once."""
    return cache_dir / SCAN_CACHE


@dataclass
class ScanResult:
    """Usable images plus everything that was left out, and why."""

    records: pd.DataFrame
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    reused: int = 0  # files whose earlier probe was reused (same path, size and mtime)
    found: int = 0  # every entry looked at: found == kept + skipped + duplicates + conflicts
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many files went where; the parts always add up to ``found``."""
        return {
            "found": self.found,
            "kept": len(self.records),
            "skipped": len(self.skipped),
            "duplicates": len(self.duplicates),
            "conflicts": sum(len(c["paths"]) for c in self.conflicts),
        }


@dataclass(frozen=True)
class Candidate:
    """A file to probe, with the label it was given (``a|b`` for several classes)."""

    path: str
    label: str
    source: str


@dataclass
class Listing:
    """What a data folder or labels CSV lists, before any file is opened."""

    classes: list[str]
    candidates: list[Candidate]
    skipped: list[dict]
    found: int  # entries listed: each ends up kept, skipped, a duplicate or a conflict
    where: dict[str, str]  # class -> where it was defined, for error messages


@dataclass(frozen=True)
class Probe:
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


def _load_probes(cache: Path | None) -> dict[tuple[str, str], Probe]:
    if cache is None or not cache.is_file():
        return {}
    try:
        frame = pd.read_parquet(cache, columns=PROBE_COLUMNS)
    except Exception as err:  # a damaged cache costs a full scan, never a wrong answer
        log.warning("ignoring the scan cache %s (%s): probing every file", cache, err)
        return {}
    frame = frame.astype(object).where(frame.notna(), None)
    return {
        (r.path, r.stat): Probe(r.hash, int(r.width), int(r.height), r.reason)
        for r in frame.itertuples(index=False)
    }


def _save_probes(cache: Path, keys: list[tuple[str, str]], probes: list[Probe]) -> None:
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


def display(path: str | Path) -> str:
    """A path fit for a report: a name that is not valid UTF-8 shows its bad bytes as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)


def walk_files(folder: Path) -> tuple[list[Path], list[dict]]:
    """Every entry under ``folder`` that is not a folder, sorted, and the folders skipped.

    Symlinked folders are followed once: a folder reached again (a symlink loop, or two
    links to one folder) is not entered twice and is reported, as is one that cannot be
    listed. Broken links and other non-files are returned, so the caller reports them.
    """
    files: list[Path] = []
    problems: list[dict] = []
    seen = {_identity(folder)}

    def unreadable(err: OSError) -> None:
        problems.append({"path": display(err.filename), "reason": f"unreadable folder: {err}"})

    for top, dirs, names in os.walk(folder, followlinks=True, onerror=unreadable):
        entered = []
        for name in sorted(dirs):
            sub = os.path.join(top, name)
            key = _identity(sub)
            if key in seen:
                problems.append(
                    {
                        "path": display(sub),
                        "reason": f"symlink loop or folder linked twice: "
                        f"{display(os.path.realpath(sub))} is scanned once",
                    }
                )
            else:
                seen.add(key)
                entered.append(name)
        dirs[:] = entered
        files.extend(Path(top, name) for name in names)
    return sorted(files), sorted(problems, key=lambda p: p["path"])


def _identity(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def probe(path: str, max_pixels: int | None) -> Probe:
    """Hash the bytes and fully decode them, so broken files fail here, not in training."""
    if not Path(path).is_file():
        if Path(path).is_symlink() and not Path(path).exists():
            return Probe(reason="broken symlink")
        return Probe(reason="file not found" if not Path(path).exists() else "not a regular file")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Probe(reason=f"unreadable: {exc.strerror or exc}")
    if not data:
        return Probe(reason="empty file")
    try:
        width, height = check(data, max_pixels)
    except UnidentifiedImageError:
        return Probe(reason="not an image, or a format Pillow cannot read")
    except ImageRejected as exc:
        return Probe(reason=str(exc))
    # Pillow's decoders raise many exception types on corrupt data (OSError, SyntaxError,
    # ValueError, struct.error, ...); any of them means "unusable".
    except Exception as exc:
        return Probe(reason=f"unreadable: {type(exc).__name__}: {exc}")
    return Probe(hash=hashlib.sha256(data).hexdigest(), width=width, height=height)


def like_unknown(name: str) -> bool:
    return name.strip().strip("_-. ").lower() == UNKNOWN_LABEL


def class_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class, or None: the one rule of ingest and review import."""
    if like_unknown(name):
        return f"'{UNKNOWN_LABEL}' is reserved for images of none of the classes"
    if display(name) != name:
        return (
            "the name is not valid UTF-8 "
            "(class names are stored in the manifest, the model and MLflow)"
        )
    if not name.strip():
        return "a class needs a name"
    if "/" in name or "\\" in name or name.startswith("."):
        return "a class name is one visible folder name: no '/' or '\\', no leading '.'"
    if LABEL_SEP in name:
        return f"'{LABEL_SEP}' separates the classes of a multi-label image"
    return None


def _class_folders(root: Path, known: Path) -> list[str]:
    classes = sorted(e.name for e in known.iterdir() if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{known} has no class folders: put the images of each class in {known}/<class>/"
        )
    for name in classes:
        if problem := class_name_problem(name):
            what = "rename it"
            if like_unknown(name):
                what = f"move those to {root / UNKNOWN_LABEL}/ instead"
            raise ValueError(f"{display(known / name)} is not allowed: {problem}; {what}")
    return classes


def _place(relative: tuple[str, ...]) -> tuple[str, str] | str:
    """(label, source) for a file at ``relative`` below the data root, or why it is not used."""
    if _is_hidden(relative):
        return "hidden file"
    top, rest = relative[0], relative[1:]
    if top == "known":
        return (rest[0], rest[0]) if len(rest) > 1 else "not inside a class folder under known/"
    if top == UNKNOWN_LABEL:
        return (UNKNOWN_LABEL, rest[0] if len(rest) > 1 else UNKNOWN_LABEL)
    return f"not under known/ or {UNKNOWN_LABEL}/ (not used)"


def _list_candidates(root: Path) -> Listing:
    """Class folders and every file under ``root``: a candidate image, or skipped and why."""
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
    classes = _class_folders(root, known)
    files, skipped = walk_files(root)
    found = len(files) + len(skipped)
    candidates: list[Candidate] = []
    for f in files:
        path = f.as_posix()
        placed = _place(f.relative_to(root).parts)
        if isinstance(placed, str):
            skipped.append({"path": display(path), "reason": placed})
        elif display(path) != path:
            skipped.append(
                {
                    "path": display(path),
                    "reason": "file name is not valid UTF-8: rename it (manifests store UTF-8)",
                }
            )
        else:
            candidates.append(Candidate(path, *placed))
    if not (root / UNKNOWN_LABEL).is_dir():
        log.info("%s does not exist: scanning known classes only", root / UNKNOWN_LABEL)
    where = {name: (known / name).as_posix() for name in classes}
    return Listing(classes, candidates, skipped, found, where)


def _probe_all(
    candidates: list[Candidate],
    cache: Path | None,
    workers: int | None,
    max_pixels: int | None,
    desc: str,
) -> tuple[list[Probe], int]:
    """Probe every candidate on all cores, reusing the cache; returns probes and files read.

    A cached probe counts only if path, size, mtime, the decoder version and the pixel
    limit all match, so changing either of the last two re-checks every file.
    """
    version = f"decode-v{DECODE_VERSION}/max{max_pixels}"
    known = _load_probes(cache)
    keys = [(c.path, f"{version}:{_stat(c.path)}") for c in candidates]
    todo = [key[0] for key in keys if key not in known]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = pool.map(lambda path: probe(path, max_pixels), todo)
        bar = tqdm(results, total=len(todo), desc=desc, unit="file", disable=None)
        fresh = dict(zip(todo, bar, strict=True))
    probes = [known[key] if key in known else fresh[key[0]] for key in keys]
    if cache is not None:
        _save_probes(cache, keys, probes)
    return probes, len(todo)


def _deduplicate(
    candidates: list[Candidate], probes: list[Probe], skipped: list[dict]
) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """Records (one per distinct image), duplicates, conflicts; unusable files go to ``skipped``."""
    by_hash: dict[str, list[tuple[Candidate, Probe]]] = defaultdict(list)
    for cand, probe in zip(candidates, probes, strict=True):
        if probe.reason is not None:
            skipped.append({"path": cand.path, "reason": probe.reason, "label": cand.label})
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
    duplicates.sort(key=lambda d: d["path"])
    conflicts.sort(key=lambda c: c["paths"][0])
    return records.astype({"width": "int64", "height": "int64"}), duplicates, conflicts


def _check_classes(result: ScanResult, where: dict[str, str]) -> None:
    """Every class must keep at least one image; say which files it lost and why.

    ``where`` tells the user where each class was defined (its folder, or the labels CSV).
    """
    kept = {name for label in set(result.records["label"]) for name in label.split(LABEL_SEP)}
    empty = [name for name in result.classes if name not in kept]
    if not empty:
        return
    left_out = [
        f"{s['path']} ({s['reason']})"
        for s in result.skipped
        if set(s.get("label", "").split(LABEL_SEP)) & set(empty)
    ]
    left_out += [
        f"{path} (conflicting labels)"
        for c in result.conflicts
        for path, label in zip(c["paths"], c["labels"], strict=True)
        if set(label.split(LABEL_SEP)) & set(empty)
    ]
    raise ValueError(
        f"class(es) with no usable images: {', '.join(where[name] for name in empty)}; add "
        "readable images or remove the class. Files left out there: "
        + ("; ".join(left_out[:5]) or "none")
    )


def scan_candidates(
    root: Path,
    listed: Listing,
    workers: int | None = None,
    cache: Path | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> ScanResult:
    """Probe, deduplicate and account for the files of ``listed``, however they were listed
    (class folders, or a labels CSV); log a summary line and warnings."""
    candidates, skipped = listed.candidates, listed.skipped
    probes, n_read = _probe_all(candidates, cache, workers, max_pixels, f"scanning {root}")
    records, duplicates, conflicts = _deduplicate(candidates, probes, skipped)
    skipped.sort(key=lambda s: s["path"])
    result = ScanResult(
        records,
        listed.classes,
        skipped,
        duplicates,
        conflicts,
        len(candidates) - n_read,
        listed.found,
    )
    _check_classes(result, listed.where)
    counts = result.counts()
    if sum(counts.values()) - counts["found"] != counts["found"]:  # a bug guard
        raise RuntimeError(f"scan of {root} lost track of files: {counts}")
    if not (records["label"] == UNKNOWN_LABEL).any():
        result.warnings.append(
            f"no unknown images in {root}: training on known classes only, so the model "
            "never learns what to reject; add images of what else the camera sees"
        )
    for s in skipped:
        log.debug("skipped %s: %s", s["path"], s["reason"])
    for message in result.warnings:
        log.warning(message)
    log.info(
        "scanned %s: %d files found, %d kept (%d classes, %d unknown), %d skipped, "
        "%d duplicates, %d with conflicting labels (%d files read, %d unchanged)",
        root,
        listed.found,
        counts["kept"],
        len(listed.classes),
        int((records["label"] == UNKNOWN_LABEL).sum()),
        counts["skipped"],
        counts["duplicates"],
        counts["conflicts"],
        n_read,
        result.reused,
    )
    return result


def scan_folder(
    root: Path,
    workers: int | None = None,
    cache: Path | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> ScanResult:
    """Open and hash every image under `root/known/<class>/` and `root/unknown/`.

    Exact duplicates under one label keep their first copy by sorted path; images whose bytes
    appear under different labels are dropped entirely, since contradictory labels cannot be
    trained on. Record paths are `root` joined with the path below it, in POSIX form.
    Files are probed on every core (threads: decoding and hashing release the GIL). With
    ``cache``, a file whose path, size and mtime match the last scan is not read again.
    Nothing is dropped silently: every entry found is kept, skipped (with a reason), a
    duplicate or a conflict, and :meth:`ScanResult.counts` adds up to the number found.
    """
    root = Path(root)
    return scan_candidates(root, _list_candidates(root), workers, cache, max_pixels)
