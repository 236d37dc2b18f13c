"""Review batches: the logged images a human should look at, and the import of their labels.

``export_batch`` picks from the prediction log the images predicted ``unknown`` and the known
predictions closest to their class's threshold, copies them (never moves them) into
``<out>/<batch>/inbox/<predicted label>/`` and lists them in ``review.csv``. The reviewer
sorts them into ``labeled/<class>/`` (a new name is a new class) or
``labeled/unknown/<source>/``, fills the ``label`` column of ``review.csv``, or labels them in
Label Studio. ``import_batch`` then copies the labeled images into the data folder with
ingest's rules: nothing is overwritten, an image already there is not added twice, and an
image whose labels disagree is reported, not imported. Everything is checked before the first
copy, so a refused import leaves ``data/`` as it was.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from opensig.data.scan import (
    Probe,
    class_name_problem,
    display,
    like_unknown,
    probe,
    scan_folder,
    walk_files,
)
from opensig.io import atomic_write, copy_new, read_json, remove_dead_copies, write_json
from opensig.label_studio import read_annotations, write_label_studio
from opensig.labels import UNKNOWN_LABEL
from opensig.monitoring.log import read_log

logger = logging.getLogger(__name__)  # `log` is the prediction log here

REVIEW_CSV = "review.csv"
IMPORTED = "imported.json"
INBOX = "inbox"
LABELED = "labeled"
REVIEW_SOURCE = "review"  # the unknown source of a bare labeled/unknown/x.png
COLUMNS = [
    "file",
    "sha256",
    "original_path",
    "predicted_label",
    "score",
    "margin",
    "suggested_action",
    "reason",
    "label",
]
SERVED = re.compile(r"image\[\d+\]")  # the path the served model logs for bytes it was sent


# -- selection ---------------------------------------------------------------------------


def select_for_review(
    log_rows: pd.DataFrame,
    exclude: set[str],
    max_images: int,
    thresholds: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """The rows a human should see first, at most ``max_images``, one per image (sha256).

    Every image predicted ``unknown`` (newest first: what the camera sees now), then the known
    predictions by their margin ``score - threshold`` of the predicted class, smallest first
    (uncertainty sampling). Of an image logged several times, the latest row with a file
    (not the served model's ``image[i]``) stands for it. Without ``thresholds`` (the log does
    not hold them) the margin is the score itself. Rows with an error, and images in
    ``exclude`` (already in the data or exported), are left out. Adds a ``margin`` column
    (for ``unknown``: how far under its threshold the nearest class is, below 0; empty
    without thresholds) and ``nearest``, that class (``unknown`` rows only).
    """
    ok = log_rows["error"].fillna("").eq("") & log_rows["sha256"].notna()
    rows = log_rows[ok & ~log_rows["sha256"].isin(exclude)]
    has_file = ~rows["path"].astype(str).str.fullmatch(SERVED.pattern)  # copyable: preferred
    rows = (
        rows.assign(_file=has_file)
        .sort_values(["_file", "time"], kind="stable")
        .drop_duplicates("sha256", keep="last")
        .drop(columns="_file")
    )
    unknown = rows["label"] == UNKNOWN_LABEL
    nearest = _nearest_class(rows, list(thresholds or {}))
    if thresholds:
        limit = rows["label"].where(~unknown, nearest).map(dict(thresholds))
        rows = rows.assign(margin=rows["score"] - limit)
    else:
        rows = rows.assign(margin=rows["score"].where(~unknown))
    rows = rows.assign(nearest=nearest.where(unknown))
    picked = pd.concat(
        [
            rows[unknown].sort_values("time", ascending=False, kind="stable"),
            rows[~unknown].sort_values("margin", kind="stable"),
        ]
    )
    return picked.head(max_images).reset_index(drop=True)


def _nearest_class(rows: pd.DataFrame, classes: list[str]) -> pd.Series:
    """The class of each row's highest ``score_<class>`` among ``classes`` (None where the
    row has none of them: another model version's classes)."""
    columns = [c for c in classes if f"score_{c}" in rows.columns]
    if not columns or rows.empty:
        return pd.Series(None, index=rows.index, dtype=object)
    values = rows[[f"score_{c}" for c in columns]].to_numpy(dtype=float)
    best = np.argmax(np.nan_to_num(values, nan=-np.inf), axis=1)
    names = np.array(columns, dtype=object)[best]
    return pd.Series(np.where(np.isnan(values).all(axis=1), None, names), index=rows.index)


def data_hashes(data_root: Path, cache: Path | None = None) -> dict[str, dict[str, str]]:
    """sha256 -> {label: a path} of every usable image in the data folder, through ingest's
    scan (``cache``: its probe cache, so unchanged files are not read again)."""
    scan = scan_folder(Path(data_root), cache=cache)
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for path, digest, label in zip(
        scan.records["path"], scan.records["hash"], scan.records["label"], strict=True
    ):
        found[digest][label] = path
    for conflict in scan.conflicts:
        for path, label in zip(conflict["paths"], conflict["labels"], strict=True):
            found[conflict["hash"]].setdefault(label, path)
    return dict(found)


def exported_hashes(review_dir: Path) -> set[str]:
    """sha256 of every image listed by an earlier batch's review.csv under ``review_dir``."""
    found: set[str] = set()
    for listing in sorted(Path(review_dir).glob(f"*/{REVIEW_CSV}")):
        table = pd.read_csv(listing, dtype=str, keep_default_na=False)
        if "sha256" not in table.columns:
            raise ValueError(f"{listing}: no sha256 column; is it a review.csv opensig wrote?")
        found.update(h for h in table["sha256"] if h)
    return found


# -- export ------------------------------------------------------------------------------


def _new_batch(review_dir: Path) -> Path:
    """A new, empty batch folder named by the time (UTC), with a suffix if that is taken."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    review_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        batch = review_dir / (f"batch-{stamp}" + (f"-{n}" if n else ""))
        try:
            batch.mkdir()
            return batch
        except FileExistsError:
            continue
    raise RuntimeError(f"{review_dir}: 1000 batches named batch-{stamp}* already exist")


def _unavailable(path: str, sha256: str) -> str | None:
    """Why the logged image cannot be copied into the batch, or None."""
    if SERVED.fullmatch(path):
        return (
            "sent to the served model as bytes: the log keeps no bytes, so there is no file "
            "to copy (log paths instead, or keep the images the clients send)"
        )
    source = Path(path)
    if not source.is_file():
        return f"file not found: {path} was moved or deleted since it was predicted"
    found = probe(path, None).hash
    if found != sha256:
        return f"{path} changed since it was predicted (its sha256 is not the logged one)"
    return None


def _action(label: str, margin: float, nearest: str | None) -> str:
    if label == UNKNOWN_LABEL:
        near = ""
        if isinstance(nearest, str) and not pd.isna(margin):
            near = f" (nearest '{nearest}', {-margin:.3f} under its threshold)"
        return (
            f"a class?{near} labeled/<class>/ (a new name is a new class), "
            "else labeled/unknown/<source>/"
        )
    return f"check: '{label}' by {margin:.3f} over its threshold; move to labeled/<class>/"


def export_batch(
    log: pd.DataFrame,
    out: Path,
    data_root: Path,
    max_images: int = 200,
    label_studio: bool = False,
    *,
    thresholds: Mapping[str, float] | None = None,
    cache: Path | None = None,
) -> Path:
    """Copy the images to review into a new batch under ``out``; returns the batch folder.

    ``log`` is ``read_log``'s frame; images already in ``data_root`` (by sha256) or listed
    by an earlier batch under ``out`` are left out. An image that cannot be copied (its
    file has gone or changed, or it came as bytes) is listed in review.csv with the reason.
    """
    out = Path(out)
    in_data = data_hashes(data_root, cache)
    exclude = set(in_data) | exported_hashes(out)
    picked = select_for_review(log, exclude, max_images, thresholds)
    batch = _new_batch(out)
    rows = []
    for rec in picked.to_dict("records"):
        label, path = str(rec["label"]), str(rec["path"])
        reason = _unavailable(path, rec["sha256"])
        file = ""
        if reason is None:
            file = copy_new(Path(path), batch / INBOX / label).relative_to(batch).as_posix()
        else:
            logger.warning("not copied into %s: %s", batch, reason)
        rows.append(
            {
                "file": file,
                "sha256": rec["sha256"],
                "original_path": path,
                "predicted_label": label,
                "score": rec["score"],
                "margin": rec["margin"],
                "suggested_action": (
                    "" if reason else _action(label, rec["margin"], rec["nearest"])
                ),
                "reason": reason or "",
                "label": "",
            }
        )
    listing = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write(batch / REVIEW_CSV, lambda tmp: listing.to_csv(tmp, index=False))
    if label_studio:
        classes = sorted(
            {c.removeprefix("score_") for c in log.columns if c.startswith("score_")}
            | {label for labels in in_data.values() for label in labels} - {UNKNOWN_LABEL}
        )
        write_label_studio(batch, listing, classes, out)
    copied = int((listing["file"] != "").sum())
    logger.info(
        "review batch %s: %d image(s) to review (%d predicted unknown), %d listed without a "
        "file (see the reason column of %s)%s",
        batch,
        copied,
        int(((listing["file"] != "") & (listing["predicted_label"] == UNKNOWN_LABEL)).sum()),
        len(listing) - copied,
        REVIEW_CSV,
        "" if len(listing) else ": nothing new to review",
    )
    return batch


class MultiLabelLog(ValueError):
    """A review batch has one label per image: a log of label sets would be refused at
    import after a person had sorted it, so export refuses it first."""


def export_from_log(
    log_dir: str,
    out: Path,
    data_root: Path,
    max_images: int,
    label_studio: bool = False,
    *,
    thresholds: Mapping[str, float] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    model_version: str | None = None,
    cache: Path | None = None,
) -> Path:
    """``export_batch`` of the prediction log in ``log_dir`` (its rows logged in [since, until],
    of ``model_version`` if given): the one export `opensig review export` and the monitor
    flow run."""
    log = read_log(log_dir, since, until, model_version)
    if "labels" in log.columns and log["labels"].notna().any():
        raise MultiLabelLog(
            f"{log_dir}: multi-label predictions (a labels column): review export takes "
            "single-label logs, multi-label review is not supported yet; label these images "
            "in Label Studio by hand, or log predictions without --multi-label"
        )
    return export_batch(
        log, out, data_root, max_images, label_studio, thresholds=thresholds, cache=cache
    )


# -- import ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Labeled:
    """One label given to one file of the batch, and where the reviewer gave it."""

    file: str  # relative to the batch folder
    label: str  # a class, or 'unknown'
    source: str  # the unknown source (a class's own name for a class)
    given_in: str  # the folder, review.csv row or Label Studio export that says so
    sha256: str | None = None  # as exported (review.csv, Label Studio), to find a moved file


def _parse_label(text: str, given_in: str) -> tuple[str, str] | str:
    """(label, source) for a label text, ``unknown/<source>`` included, or the problem."""
    text = text.strip()
    head, _, source = text.partition("/")
    if head == UNKNOWN_LABEL:
        return UNKNOWN_LABEL, source.strip() or REVIEW_SOURCE
    if problem := class_name_problem(text):
        hint = (
            f"use '{UNKNOWN_LABEL}' or {LABELED}/{UNKNOWN_LABEL}/<source>/ instead"
            if like_unknown(text)
            else "rename it"
        )
        return f"{given_in}: class {text!r} is not allowed: {problem}; {hint}"
    return text, text


def _from_folders(batch: Path) -> tuple[list[_Labeled], list[str], list[dict]]:
    """Labels given by the reviewer's folders; the problems; files left out (and why)."""
    labeled = batch / LABELED
    if not labeled.is_dir():
        return [], [], []
    found, problems, left_out = [], [], []
    files, unreadable = walk_files(labeled)
    left_out += [
        {"file": u["path"], "status": "skipped", "reason": u["reason"]} for u in unreadable
    ]
    for path in files:
        parts = path.relative_to(labeled).parts
        rel = path.relative_to(batch).as_posix()
        if any(p.startswith(".") for p in parts):
            left_out.append({"file": rel, "status": "skipped", "reason": "hidden file"})
        elif len(parts) == 1:
            reason = f"not in a class folder: move it to {LABELED}/<class>/"
            left_out.append({"file": rel, "status": "skipped", "reason": reason})
        elif parts[0] == UNKNOWN_LABEL:
            source = parts[1] if len(parts) > 2 else REVIEW_SOURCE
            found.append(_Labeled(rel, UNKNOWN_LABEL, source, (labeled / parts[0]).as_posix()))
        else:
            placed = _parse_label(parts[0], display(labeled / parts[0]))
            if isinstance(placed, str):
                problems.append(placed)
            else:
                found.append(_Labeled(rel, *placed, (labeled / parts[0]).as_posix()))
    return found, sorted(set(problems)), left_out


def _from_csv(batch: Path) -> tuple[list[_Labeled], list[str]]:
    """Labels filled into the ``label`` column of the batch's review.csv."""
    listing = batch / REVIEW_CSV
    if not listing.is_file():
        return [], []
    table = pd.read_csv(listing, dtype=str, keep_default_na=False)
    if "label" not in table.columns or "file" not in table.columns:
        return [], []
    found, problems = [], []
    for i, rec in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        if not rec["label"].strip():
            continue
        where = f"{listing} line {i}"
        if not rec["file"]:
            problems.append(f"{where}: a label for an image with no file ({rec['reason']})")
            continue
        placed = _parse_label(rec["label"], where)
        if isinstance(placed, str):
            problems.append(placed)
        else:
            found.append(_Labeled(rec["file"], *placed, where, rec.get("sha256") or None))
    return found, problems


def _from_label_studio(export: Path) -> tuple[list[_Labeled], list[str]]:
    found, problems = [], []
    for file, text, digest in read_annotations(export):
        where = f"{export} (task of {file})"
        placed = _parse_label(text, where)
        if isinstance(placed, str):
            problems.append(placed)
        else:
            found.append(_Labeled(file, *placed, where, digest))
    return found, problems


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise ValueError(f"{what}: {shown} (nothing was imported)")


def _destination(data_root: Path, item: _Labeled) -> Path:
    if item.label == UNKNOWN_LABEL:
        return data_root / UNKNOWN_LABEL / item.source
    return data_root / "known" / item.label


def _read_labels(batch: Path, label_studio: Path | None) -> tuple[list[_Labeled], list[dict]]:
    """Every label given to the batch's files (folders, review.csv, the Label Studio export)
    and the report rows of the files left out. A label ingest would refuse stops the import
    here, before any image is opened."""
    found, problems, left_out = _from_folders(batch)
    from_csv, csv_problems = _from_csv(batch)
    found += from_csv
    problems += csv_problems
    if label_studio is not None:
        from_ls, ls_problems = _from_label_studio(label_studio)
        found += from_ls
        problems += ls_problems
    _refuse(problems, f"{batch}: labels ingest would refuse")
    return found, left_out


def _probe_labeled(batch: Path, found: list[_Labeled]) -> dict[str, Probe]:
    """The probe of every labeled file. A file that has gone stops the import, unless another
    file of the batch has its exported sha256: the reviewer moved it, the label still holds."""
    probes = {item.file: probe((batch / item.file).as_posix(), None) for item in found}
    present = {p.hash for p in probes.values() if p.hash}
    gone = [
        f"{batch / item.file} ({item.given_in})"
        for item in found
        if probes[item.file].reason == "file not found" and item.sha256 not in present
    ]
    _refuse(gone, f"{batch}: labeled files have gone; restore them or clear their label")
    return probes


def _verdict(items: list[_Labeled], there: dict[str, str]) -> dict:
    """The status of one image (and why): added only if the batch gives it one label and the
    data does not hold it under another; ``there`` is the data's label -> path of it."""
    labels = sorted({i.label for i in items})
    if len(labels) > 1:
        given = ", ".join(f"{i.label} ({i.given_in})" for i in items)
        logger.warning("%s has two labels in this batch, not imported: %s", items[0].file, given)
        return {"status": "conflict", "reason": f"labeled differently in this batch: {given}"}
    if labels[0] in there:
        return {"status": "already in data", "destination": there[labels[0]]}
    if there:
        other = ", ".join(f"{label} ({path})" for label, path in sorted(there.items()))
        logger.warning("%s is already in the data under another label: %s", items[0].file, other)
        return {"status": "conflict", "reason": f"already in the data as {other}"}
    return {"status": "added"}


def _plan(
    found: list[_Labeled], probes: dict[str, Probe], in_data: dict[str, dict[str, str]]
) -> tuple[dict[str, _Labeled], list[dict]]:
    """What becomes of each labeled image, as ingest would see it (by sha256): the images to
    copy (sha256 -> the labeled file to copy) and a report row per file, before any copy."""
    present = {p.hash for p in probes.values() if p.hash}
    rows: list[dict] = []
    by_hash: dict[str, list[_Labeled]] = defaultdict(list)
    for item in found:
        digest = probes[item.file].hash or (item.sha256 if item.sha256 in present else None)
        if digest is None:
            reason = probes[item.file].reason
            rows.append({"file": item.file, "status": "skipped", "reason": reason})
        else:
            by_hash[digest].append(item)
    to_copy: dict[str, _Labeled] = {}
    for digest, items in by_hash.items():
        items.sort(key=lambda i: (probes[i.file].hash is None, i.file, i.given_in))  # a file first
        row = {
            "sha256": digest,
            "label": min(i.label for i in items),
            "given_in": items[0].given_in,
        }
        row |= _verdict(items, in_data.get(digest, {}))
        if row["status"] == "added":
            to_copy[digest] = items[0]
        files = sorted({i.file for i in items if probes[i.file].hash})
        rows += [{**row, "file": f} for f in files[:1]]
        rows += [
            {**row, "file": f, "status": "duplicate", "duplicate_of": files[0]} for f in files[1:]
        ]
    return to_copy, rows


def _copy_into_data(batch: Path, data_root: Path, to_copy: dict[str, _Labeled]) -> dict[str, str]:
    """Copy each image to its label's folder, never overwriting; sha256 -> where it went."""
    return {
        digest: copy_new(batch / item.file, _destination(data_root, item)).as_posix()
        for digest, item in to_copy.items()
    }


def read_imports(batch: Path) -> list[dict]:
    """What each import of ``batch`` did, oldest first (``<batch>/imported.json``)."""
    path = Path(batch) / IMPORTED
    if not path.exists():
        return []
    saved = read_json(path)
    return saved.get("imports", [saved])  # an older opensig kept the last import only


def _check_unknown_sources(
    labels: set[str], data_root: Path, holdout: Sequence[str], from_unknown: Sequence[str]
) -> list[str]:
    """The unknown sources to move into their class first; refuses, before anything is
    copied, a class that is also an unknown source or held out (ingest would refuse it)."""
    sources = {p.name for p in (data_root / UNKNOWN_LABEL).glob("*") if p.is_dir()}
    missing = sorted(set(from_unknown) - sources)
    if missing:
        raise ValueError(
            f"--from-unknown {missing[0]}: there is no {data_root / UNKNOWN_LABEL / missing[0]}/"
            f" to move; unknown sources there: {sorted(sources) or 'none'}"
        )
    for label in sorted(labels - {UNKNOWN_LABEL} - set(from_unknown)):
        if label in sources:
            raise ValueError(
                f"class {label!r} is also an unknown source ({data_root / UNKNOWN_LABEL / label}/"
                f"{', in data.holdout_unknown' if label in holdout else ''}): rerun with "
                f"--from-unknown {label} to move its images into the class first, or rename "
                "the class in the batch"
            )
        if label in holdout:
            raise ValueError(
                f"class {label!r} is in data.holdout_unknown: take it out of the params file "
                "first, or rename the class in the batch"
            )
    return list(from_unknown)


def _move_into_class(data_root: Path, source: str) -> dict:
    """The images of ``unknown/<source>/`` moved into ``known/<source>/`` (copied under a
    free name, then removed); the record imported.json keeps."""
    folder, target = data_root / UNKNOWN_LABEL / source, data_root / "known" / source
    moved = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        moved.append({"from": path.as_posix(), "to": copy_new(path, target).as_posix()})
        path.unlink()
    shutil.rmtree(folder)  # empty folders only are left
    logger.info("moved %d image(s) from %s/ into %s/", len(moved), folder, target)
    return {"source": source, "class": source, "files": moved}


def _write_report(
    batch: Path,
    data_root: Path,
    rows: list[dict],
    copied: dict[str, _Labeled],
    placed: dict[str, str],
    known_before: set[str],
    moved: list[dict],
) -> dict:
    """Append to ``<batch>/imported.json`` what this import did to every file (so the
    reviewer can see why an image was not added) and the unknown sources it moved into a
    class; returns it."""
    added = Counter(item.label for item in copied.values())
    classes = sorted(known_before | {item.label for item in copied.values()} - {UNKNOWN_LABEL})
    rows = [
        {**row, "destination": placed[row["sha256"]]} if row.get("status") == "added" else row
        for row in rows
    ]
    report = {
        "batch": batch.as_posix(),
        "data_root": data_root.as_posix(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "added": dict(sorted(added.items())),
        "classes": classes,
        "new_classes": sorted(set(classes) - known_before),
        "counts": dict(sorted(Counter(r["status"] for r in rows).items())),
        "moved_from_unknown": moved,
        "files": sorted(rows, key=lambda r: r["file"]),
    }
    write_json(batch / IMPORTED, {"imports": [*read_imports(batch), report]})
    logger.info(
        "imported %s into %s: %d image(s) added %s, new classes %s; what became of each file: %s",
        batch,
        data_root,
        sum(added.values()),
        report["added"] or "",
        report["new_classes"] or "none",
        batch / IMPORTED,
    )
    return report


def _remove_killed_copies(data_root: Path) -> None:
    """The half-written copies an import killed mid-copy left in data/'s label folders (see
    :func:`opensig.io.remove_dead_copies`), and a folder it had just made that holds nothing
    else: a class folder without images would stop the next ingest."""
    for folder in sorted(data_root.glob("known/*")) + sorted(data_root.glob("unknown/*")):
        if folder.is_dir() and (removed := remove_dead_copies(folder)):
            logger.warning("%s: removed %d partial copies of a killed import", folder, removed)
            if not any(folder.iterdir()):
                folder.rmdir()


def import_batch(
    batch: Path,
    data_root: Path,
    *,
    label_studio: Path | None = None,
    cache: Path | None = None,
    holdout: Sequence[str] = (),
    from_unknown: Sequence[str] = (),
) -> dict:
    """Copy the batch's labeled images into ``data_root``; returns (and appends to
    ``<batch>/imported.json``) what became of every file, ``added`` per label, ``classes``
    (the data's classes afterwards) and ``new_classes``.

    Labels come from ``labeled/`` folders, review.csv's ``label`` column and, with
    ``label_studio``, a Label Studio JSON export. A bad class name, a labeled file that
    has gone, or a class that is also an unknown source (or in ``holdout``, the data's
    held-out unknown sources) stops the import before anything is copied; the sources in
    ``from_unknown`` are moved into their class first. Importing a batch again adds
    nothing: its images are in the data already.
    """
    batch, data_root = Path(batch), Path(data_root)
    if not batch.is_dir():
        raise FileNotFoundError(
            f"review batch {batch} does not exist: pass a folder that `opensig review export` made"
        )
    found, left_out = _read_labels(batch, label_studio)
    probes = _probe_labeled(batch, found)
    to_move = _check_unknown_sources({i.label for i in found}, data_root, holdout, from_unknown)
    _remove_killed_copies(data_root)  # before the data is read: a killed import's leftovers
    in_data = data_hashes(data_root, cache)
    known_before = {label for labels in in_data.values() for label in labels} - {UNKNOWN_LABEL}
    moved = [_move_into_class(data_root, source) for source in to_move]
    if moved:  # the moved images are the class's now
        in_data = data_hashes(data_root, cache)
    to_copy, rows = _plan(found, probes, in_data)
    placed = _copy_into_data(batch, data_root, to_copy)
    return _write_report(batch, data_root, left_out + rows, to_copy, placed, known_before, moved)


def announce(report: dict, project: Path) -> None:
    """Tell Prefect that data was added (the retrain deployment's trigger), or else the user
    what to run to retrain on it."""
    from opensig.events import DATA_ADDED, emit, project_resource

    if not report["added"]:
        logger.info("nothing was added to the data: nothing to retrain on")
        return
    payload = {key: report[key] for key in ("batch", "added", "classes", "new_classes")}
    if emit(DATA_ADDED, payload, project_resource(project)):
        return
    logger.info(
        "no Prefect API (PREFECT_API_URL unset), so no retrain was triggered: run "
        "`dvc add data && dvc repro` (or `opensig retrain`) to train on the new images"
    )
