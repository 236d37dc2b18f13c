"""A prediction job, as ``opensig predict`` runs it: image files and folders in, one row per
file out (CSV or JSON lines), appended to the prediction log and sorted into label folders
when asked. Nothing goes unmentioned: every file that was not predicted has an error row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from opensig.config import MlflowConfig
from opensig.data.scan import display, walk_files
from opensig.io import atomic_write
from opensig.labels import UNKNOWN_LABEL
from opensig.monitoring.log import PredictionLog
from opensig.predict import Bundle
from opensig.tracking.model_uri import local_bundle, model_identity
from opensig.tracking.store import tracking_uri

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".jsonl")


class NoInputs(ValueError):
    """None of the inputs holds a file to predict."""


@dataclass(frozen=True)
class Sorting:
    """``predict --sort-into``: copies (or hard links) into ``into/<label>/``, in score
    sub-folders cut at ``cuts`` (:mod:`opensig.sorting`)."""

    into: Path
    link: bool = False
    cuts: list[float] = field(default_factory=list)


@dataclass
class JobResult:
    frame: pd.DataFrame  # what was written: one row per file, error rows included
    missing: list[str]  # inputs that do not exist (their rows are error rows)


def collect_images(inputs: Iterable[Path]) -> tuple[list[Path], list[dict]]:
    """Files to predict, and entries not predicted (hidden files, folder loops) with reasons.

    Folders are walked like ingest walks data/ (symlinks followed once); files named on the
    command line are kept as given, so a missing one becomes an error row, not a crash.
    """
    found: list[Path] = []
    left_out: list[dict] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(item)
            continue
        files, problems = walk_files(item)
        left_out.extend(problems)
        for f in files:
            if any(part.startswith(".") for part in f.relative_to(item).parts):
                left_out.append({"path": display(f), "reason": "hidden file (not predicted)"})
            else:
                found.append(f)
    return found, left_out


def with_left_out(frame: pd.DataFrame, left_out: list[dict]) -> pd.DataFrame:
    """Prediction rows plus one error row per entry not predicted: nothing goes unmentioned."""
    if not left_out:
        return frame
    rows = pd.DataFrame({"path": [e["path"] for e in left_out]})
    rows["error"] = [e["reason"] for e in left_out]
    return pd.concat([frame, rows], ignore_index=True)[list(frame.columns)]


def write_predictions(frame: pd.DataFrame, out: Path) -> None:
    """CSV or JSON lines by the file's suffix."""
    if out.suffix == ".jsonl":
        atomic_write(out, lambda tmp: frame.to_json(tmp, orient="records", lines=True))
    elif out.suffix == ".csv":
        atomic_write(out, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        raise ValueError(f"--out {out}: use a .csv or .jsonl file")


def predict_job(
    inputs: Sequence[Path],
    out: Path,
    *,
    model: str,
    store: MlflowConfig,
    thresholds: Path | None = None,
    device: str = "auto",
    force: bool = False,
    batch_size: int = 256,
    workers: int | str = "auto",
    multi_label: bool = False,
    sorting: Sorting | None = None,
    log_dir: str | None = None,
) -> JobResult:
    """Predict every image below ``inputs`` with ``model`` (as :func:`local_bundle` takes it,
    resolved in ``store``), write the rows to ``out``, append them to the prediction log
    ``log_dir`` and sort the images when asked.

    Raises :class:`NoInputs` before the model is fetched when there is no file at all.
    """
    files, left_out = collect_images(inputs)
    if not files:
        raise NoInputs("no files found in the given inputs")
    bundle_dir = local_bundle(model, store)
    bundle = Bundle.load(bundle_dir, thresholds, device, force)
    frame = bundle.predict(
        files, batch_size=batch_size, num_workers=workers, multi_label=multi_label
    )
    if log_dir is not None:
        identity = model_identity(model, bundle_dir, tracking_uri(store))
        PredictionLog(log_dir, *identity).append(frame, files)
    frame = with_left_out(frame, left_out)
    write_predictions(frame, out)
    if sorting is not None:
        from opensig.sorting import sort_into

        sort_into(frame, sorting.into, sorting.link, sorting.cuts)
    failed = frame[frame["error"] != ""]
    for row in failed.itertuples():
        log.warning("not predicted: %s: %s", row.path, row.error)
    missing = [str(p) for p in inputs if not Path(p).exists()]
    unknown = int((frame["label"] == UNKNOWN_LABEL).sum())
    report_job(str(out), len(frame), len(failed), unknown, missing)
    return JobResult(frame, missing)


def report_job(out: str, written: int, failed: int, unknown: int, missing: list[str]) -> None:
    """The job's closing lines, the same for every engine: what was written, and the inputs
    that do not exist (their error rows are in ``out``)."""
    log.info(
        "wrote %d rows to %s: %d predicted (%d unknown), %d not predicted (see the error column)",
        written,
        out,
        written - failed,
        unknown,
        failed,
    )
    if missing:
        log.error(
            "predict: %d input(s) do not exist: %s (the other inputs are predicted in %s)",
            len(missing),
            ", ".join(missing),
            out,
        )
