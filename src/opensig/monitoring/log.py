"""The prediction log: every prediction of `opensig predict --log` and of the served model,
one row per image, as a Parquet dataset partitioned by day.

Layout: ``<DIR>/date=YYYY-MM-DD/<host>-<pid>-<8 random hex>-<seq>.parquet``. Each appended
batch is one new file, written under a hidden name and renamed into place, so several
processes (gunicorn workers) never share a file, a crash loses at most the batch in flight,
and no row once written is ever rewritten. DIR is a local path or any fsspec URL; pandas and
pyarrow read it directly (``pd.read_parquet(DIR)``), hidden temp files are skipped by both.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import secrets
import socket
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from opensig.data.images import ImageSource
from opensig.io import read_json

log = logging.getLogger(__name__)

MONITOR_FILE = "monitor.json"  # in a registered bundle: {"log_dir", "model"} (register)
LOG_ENV = "OPENSIG_PREDICTION_LOG"  # the served model logs there, whatever travels with it
LEADING = ["time", "model", "model_version", "path", "sha256", "label", "score"]
PARTITION = "date="


def input_sha256(source: ImageSource) -> str | None:
    """sha256 of an input's bytes (a file's content, or the bytes themselves); None when the
    file cannot be read (its row then carries the error that predict recorded)."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    try:
        with open(source, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _schema(frame: pd.DataFrame) -> pa.Schema:
    """Fixed types, so that an all-failed batch (labels all None) still reads as strings."""
    fields = [
        pa.field("time", pa.timestamp("us", tz="UTC")),
        *(pa.field(c, pa.string()) for c in LEADING[1:6]),
        pa.field("score", pa.float64()),
    ]
    fields += [pa.field(c, pa.float64()) for c in frame.columns if c.startswith("score_")]
    if "labels" in frame.columns:
        fields.append(pa.field("labels", pa.string()))
    return pa.schema([*fields, pa.field("error", pa.string())])


class PredictionLog:
    """Appends predictions of one model to the log at ``root``, one file per batch."""

    def __init__(self, root: str, model: str, model_version: str) -> None:
        self.root = str(root).rstrip("/")
        self.model = model
        self.model_version = model_version
        self._fs, self._base = fsspec.core.url_to_fs(self.root)
        self._lock = threading.Lock()
        self._pid: int | None = None

    def _next_name(self) -> str:
        """``host-pid-random-seq``; a fresh prefix in a forked child, so workers never collide."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._prefix = f"{socket.gethostname()}-{self._pid}-{secrets.token_hex(4)}"
                self._seq = itertools.count()
            return f"{self._prefix}-{next(self._seq):06d}"

    def append(self, frame: pd.DataFrame, sources: Sequence[ImageSource]) -> None:
        """Log ``Bundle.predict``'s ``frame`` for ``sources`` (same order) as one new file."""
        if len(frame) != len(sources):
            raise ValueError(f"{len(frame)} prediction rows for {len(sources)} inputs")
        if frame.empty:
            return
        now = datetime.now(timezone.utc)
        columns = {
            "time": [now] * len(frame),
            "model": [self.model] * len(frame),
            "model_version": [self.model_version] * len(frame),
            "path": frame["path"].astype(str),
            "sha256": [input_sha256(s) for s in sources],
        }
        schema = _schema(frame)
        table = pa.table(
            [
                pa.array(
                    columns[f.name] if f.name in columns else frame[f.name],
                    f.type,
                    from_pandas=True,
                )
                for f in schema
            ],
            schema=schema,
        )
        folder = f"{self._base}/{PARTITION}{now:%Y-%m-%d}"
        name = self._next_name()
        self._fs.makedirs(folder, exist_ok=True)
        tmp, final = f"{folder}/.{name}.tmp", f"{folder}/{name}.parquet"
        try:
            with self._fs.open(tmp, "wb") as f:
                pq.write_table(table, f)
            self._fs.mv(tmp, final)
        except BaseException:
            if self._fs.exists(tmp):
                self._fs.rm(tmp)
            raise
        log.debug("logged %d predictions to %s", len(table), final)


def utc(moment: datetime | None) -> pd.Timestamp | None:
    """A naive datetime is read as UTC, the log's own time zone."""
    if moment is None:
        return None
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def between(frame: pd.DataFrame, since: datetime | None, until: datetime | None) -> pd.DataFrame:
    """The rows of ``frame`` logged in [since, until] (either end open when None)."""
    start, end = utc(since), utc(until)
    keep = pd.Series(True, index=frame.index)
    if start is not None:
        keep &= frame["time"] >= start
    if end is not None:
        keep &= frame["time"] <= end
    return frame[keep]


def _log_files(fs: fsspec.AbstractFileSystem, base: str, root: str) -> list[str]:
    if not fs.isdir(base):
        raise FileNotFoundError(
            f"{root}: no prediction log there; predict with `opensig predict ... --log {root}` "
            "or set monitor.log_dir to the folder the served model logs into"
        )
    files = sorted(  # not below a hidden or _temporary folder (Spark's, mid-write)
        p
        for p in fs.find(base)
        if p.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in Path(p[len(base) :]).parts)
    )
    if not files:
        raise FileNotFoundError(
            f"{root}: the prediction log is empty (no date=*/…parquet files); predict with "
            f"--log {root} first"
        )
    return files


def _in_range(path: str, since: pd.Timestamp | None, until: pd.Timestamp | None) -> bool:
    """Skip a day's partition wholly outside [since, until] without opening its files."""
    day = next((p[len(PARTITION) :] for p in path.split("/") if p.startswith(PARTITION)), None)
    if day is None:
        return True
    return not (
        (since is not None and day < f"{since:%Y-%m-%d}")
        or (until is not None and day > f"{until:%Y-%m-%d}")
    )


def _read_file(fs: fsspec.AbstractFileSystem, path: str, root: str) -> pd.DataFrame:
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f).to_pandas()
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(
            f"{root}: {path} is not a readable Parquet file (cut short by a crash?): {err}; "
            "move it out of the log folder to read the rest"
        ) from None


def read_log(
    root: str,
    since: datetime | None = None,
    until: datetime | None = None,
    model_version: str | None = None,
) -> pd.DataFrame:
    """Every logged row (times in [since, until], of ``model_version`` if given), the
    schemas of all files unified (a model with other classes has other score columns),
    sorted by time."""
    root = str(root).rstrip("/")
    fs, base = fsspec.core.url_to_fs(root)
    start, end = utc(since), utc(until)
    files = [p for p in _log_files(fs, base, root) if _in_range(p, start, end)]
    frames = [_read_file(fs, p, root) for p in files]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LEADING)
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    frame = between(frame, since, until)
    if model_version is not None:
        versions = sorted(frame["model_version"].dropna().unique())
        frame = frame[frame["model_version"] == model_version]
        if frame.empty:
            raise ValueError(
                f"{root}: no rows of model version {model_version!r} in that time range; "
                f"the log holds versions {versions or 'none'}: pass one of them (--model-version)"
            )
    scores = [c for c in frame.columns if c.startswith("score_")]  # class order, first seen
    extra = ["labels"] if "labels" in frame.columns else []
    ordered = [*LEADING, *scores, *extra, "error"]
    return frame.sort_values("time", kind="stable").reset_index(drop=True)[ordered]


def served_identity(bundle_dir: Path) -> tuple[str, str]:
    """(model, model_version) of the served pyfunc whose bundle is ``bundle_dir``: the
    registry's name and version of the run in the MLmodel file beside it when a tracking
    URI is set and answers, else the registered name ``monitor.json`` records (or the
    folder) and the model's digest."""
    import yaml
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from opensig.model import model_digest

    travelled = bundle_dir / MONITOR_FILE
    name = read_json(travelled).get("model") if travelled.is_file() else None
    mlmodel = bundle_dir.parent.parent / "MLmodel"
    run_id = yaml.safe_load(mlmodel.read_text()).get("run_id") if mlmodel.is_file() else None
    if run_id and os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            found = MlflowClient().search_model_versions(f"run_id='{run_id}'")
        except MlflowException as err:
            log.warning("prediction log: no registry lookup of run %s (%s)", run_id, err.message)
            found = []
        mine = [v for v in found if name is None or v.name == name]
        if mine:
            latest = max(mine, key=lambda v: int(v.version))
            return latest.name, str(latest.version)
    return name or str(bundle_dir), model_digest(bundle_dir)


def served_log_dir(bundle_dir: Path) -> str | None:
    """Where the served model logs: ``$OPENSIG_PREDICTION_LOG``, else the ``log_dir`` that
    travelled with it, else nowhere."""
    travelled = bundle_dir / MONITOR_FILE
    return os.environ.get(LOG_ENV) or (
        read_json(travelled).get("log_dir") if travelled.is_file() else None
    )
