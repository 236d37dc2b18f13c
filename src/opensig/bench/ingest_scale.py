"""Ingest at scale: what one file costs opensig's ingest, DVC and the prediction log, measured
on a tree large enough (200k files by default) that the per-file figure is not start-up, so
that docs/scale.md can multiply it up to 1M and 10M images.

Every step is timed on its own. opensig's steps run in a fresh process each (which imports
what the step's command imports, not torch), so that the peak RSS reported is the step's own,
and beside it how much of it the step itself added; DVC runs as a user runs it,
``python -m dvc ...``, its peak RSS read from /proc while it runs:

- a synthetic tree of ``files`` distinct 28x28 PNGs (scikit-learn's digits, each file's index
  written into its first four pixels so that every hash differs) in 6 class folders and 2
  unknown sources; writing it is timed apart: it is not opensig's cost;
- the ingest stage (``stages.ingest``: list, open, decode, hash, split, write the manifest):
  the first run, a re-run on the unchanged tree (probe cache hit), and a run after ``added``
  new files (the next retrain's data);
- in a git + DVC repository holding the tree: ``dvc add data``, ``dvc status`` (unchanged),
  ``dvc push`` to a local-folder remote (the nearest thing to object storage here), the same
  after the added files, and ``dvc pull`` into a fresh clone (a training machine's start);
- a prediction log of ``log_rows`` rows written with opensig's own writer, ``log_batch``
  rows per file; then ``read_log``, ``monitor_log`` (what ``opensig monitor`` runs) and
  ``export_from_log`` (what ``opensig review export`` runs) over it.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from opensig.bench.options import IngestScaleOptions
from opensig.config import Config, MlflowConfig, MonitorConfig
from opensig.io import write_json
from opensig.labels import UNKNOWN_LABEL

log = logging.getLogger(__name__)

NAME = "opensig-bench-ingest-scale"
CLASSES = tuple(f"c{k}" for k in range(6))
SOURCES = ("u0", "u1")  # u1 is held out, as the demo holds out 8 and 9
FOLDERS = (*(f"known/{c}" for c in CLASSES), *(f"{UNKNOWN_LABEL}/{s}" for s in SOURCES))
SIZE = 28  # px, Fashion-MNIST's size: a small file, so per-file costs dominate
UNKNOWN_RATE = 0.1  # share of logged predictions that are 'unknown'
ERROR_RATE = 0.005  # share of logged inputs that could not be read
GIT_USER = ["-c", "user.name=opensig bench", "-c", "user.email=bench@localhost"]


def check(opts: IngestScaleOptions) -> None:
    """Every option, before anything is written."""
    if opts.files < 10 * len(FOLDERS):
        raise ValueError(f"bench ingest-scale: --files must be >= {10 * len(FOLDERS)}")
    if opts.added is not None and opts.added < 1:
        raise ValueError("bench ingest-scale: --added must be >= 1")
    if opts.log_rows < 200 or opts.log_batch < 1 or opts.review_max < 1:
        raise ValueError(
            "bench ingest-scale: --log-rows >= 200, --log-batch >= 1, --review-max >= 1"
        )
    if opts.dvc and shutil.which("git") is None:
        raise FileNotFoundError("bench ingest-scale: git is not on PATH (or pass --no-dvc)")


# -- the synthetic data ------------------------------------------------------------------


def base_images() -> np.ndarray:
    """scikit-learn's 1797 digits as 28x28 uint8: the content the synthetic files start from."""
    from sklearn.datasets import load_digits

    digits = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    size = (SIZE, SIZE)
    return np.stack(
        [np.asarray(Image.fromarray(d).resize(size, Image.Resampling.NEAREST)) for d in digits]
    )


def image_bytes(base: np.ndarray, index: int) -> bytes:
    """A PNG of a digit with ``index`` in its first four pixels: distinct bytes per index.
    Stored uncompressed, as the demo data, so the bytes are the same on every machine."""
    pixels = base[index % len(base)].copy()
    pixels.flat[:4] = np.frombuffer(index.to_bytes(4, "little"), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def tree_path(root: Path, index: int) -> Path:
    return root / FOLDERS[index % len(FOLDERS)] / f"img_{index:08d}.png"


def write_tree(root: Path, base: np.ndarray, indices: range) -> dict:
    """Files ``indices`` of the synthetic tree; its writing time (not a figure of opensig)."""
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for index in tqdm(indices, desc=f"writing {root}", unit="file", disable=None):
        tree_path(root, index).write_bytes(image_bytes(base, index))
    return {"files": len(indices), "seconds": time.perf_counter() - start}


def footprint(folder: Path) -> dict:
    """Files below ``folder``, their bytes, and the disk they take: a small file takes a
    whole block, so on disk 10M tiny files cost more than their bytes."""
    files = size = disk = 0
    for top, _, names in os.walk(folder):
        for name in names:
            st = os.lstat(os.path.join(top, name))
            files, size, disk = files + 1, size + st.st_size, disk + st.st_blocks * 512
    return {"files": files, "bytes": size, "disk_bytes": disk}


# -- measuring a step --------------------------------------------------------------------


def _peak_rss(pid: int | str = "self") -> int:
    """The process's peak RSS so far (VmHWM), 0 where /proc cannot tell (not Linux, or it
    ended). Not ``ru_maxrss``: a child inherits its parent's peak across fork and exec, so a
    small child of a big benchmark process would report the benchmark's."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else 0  # kB


@contextmanager
def clock(figures: dict) -> Iterator[None]:
    """Time the block into ``figures``, with the process's peak RSS before it: a step's
    imports and set-up are not its per-item cost."""
    figures["rss_before_bytes"] = _peak_rss()
    start = time.perf_counter()
    yield
    figures["seconds"] = time.perf_counter() - start


def _measured(step: Callable[..., dict], kwargs: dict) -> dict:
    return step(**kwargs) | {"peak_rss_bytes": _peak_rss()}


def in_child(step: Callable[..., dict], **kwargs: object) -> dict:
    """``step(**kwargs)`` in a fresh process: its figures and that process's peak RSS."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measured, step, kwargs).result()


def run_command(args: list[str], cwd: Path, logs: Path) -> dict:
    """``args`` as a user runs them, output to a file in ``logs``: wall time and peak RSS
    (the process's VmHWM, read every 50 ms while it runs)."""
    logs.mkdir(parents=True, exist_ok=True)
    name = "-".join(a for a in args[2:5] if not a.startswith("-"))
    logfile = logs / f"{name}.log"
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    with logfile.open("ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _peak_rss(proc.pid))
            time.sleep(0.05)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}) in {cwd}: {tail}")
    return {"seconds": seconds, "peak_rss_bytes": peak}


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *GIT_USER, *args], cwd=cwd, check=True, capture_output=True)


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def site_cache(repo: Path) -> Path:
    """DVC's own state for ``repo`` (file hashes, its index), kept outside the repository
    (``/var/tmp/dvc/repo/<hash>`` on Linux, a new one per new repository): it grows with the
    files tracked."""
    code = "import sys; from dvc.repo import Repo; print(Repo(sys.argv[1]).site_cache_dir)"
    found = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True)
    if found.returncode != 0:
        raise RuntimeError(f"cannot find DVC's site cache of {repo}: {found.stderr[-2000:]}")
    return Path(found.stdout.strip())


# -- the steps (each in a fresh process) -------------------------------------------------


def ingest_step(cfg: Config, out: Path) -> dict:
    """The ingest stage on ``cfg.data.root``, its outputs under ``out``."""
    from opensig import stages
    from opensig.data.scan import ScanResult, scan_cache

    scans: list[ScanResult] = []
    scan_folder = stages.scan_folder

    def kept(*args: object, **kwargs: object) -> ScanResult:  # to read how many were reused
        scans.append(scan_folder(*args, **kwargs))
        return scans[-1]

    stages.scan_folder = kept  # in this process only
    at = stages.Layout.under(out)
    figures: dict = {}
    with clock(figures):
        report = stages.ingest(cfg, at)
    return figures | {
        "files": report["files"]["found"],
        "kept": report["images"],
        "reused": scans[0].reused,
        "manifest_bytes": at.manifest.stat().st_size,
        "report_bytes": at.ingest_report.stat().st_size,
        "scan_cache_bytes": scan_cache(cfg.data.cache_dir).stat().st_size,
    }


def _log_batch(
    rng: np.random.Generator, first: int, n: int, files: list[str], total: int
) -> tuple[pd.DataFrame, list]:
    """Rows ``first`` .. ``first + n`` of the log, shaped like ``Bundle.predict``'s frame: the
    last ``len(files)`` rows are files (``predict --log``), the others bytes a served model
    was sent (path ``image[i]``, one of ``ERROR_RATE`` unreadable)."""
    rows = range(first, first + n)
    from_file = total - len(files)
    sources = [files[i - from_file] if i >= from_file else f"row-{i}".encode() for i in rows]
    scores = rng.beta(2.0, 5.0, size=(n, len(CLASSES)))
    top = scores.argmax(axis=1)
    labels = np.array(CLASSES, dtype=object)[top]
    labels[rng.random(n) < UNKNOWN_RATE] = UNKNOWN_LABEL
    failed = (rng.random(n) < ERROR_RATE) & (np.array(rows) < from_file)
    frame = pd.DataFrame(
        {
            "path": [
                s if isinstance(s, str) else f"image[{i - first}]"
                for i, s in zip(rows, sources, strict=True)
            ],
            "label": np.where(failed, None, labels),
            "score": np.where(failed, np.nan, scores[np.arange(n), top]),
        }
    )
    for k, name in enumerate(CLASSES):
        frame[f"score_{name}"] = np.where(failed, np.nan, scores[:, k])
    frame["error"] = np.where(failed, "cannot identify image file", "")
    return frame, sources


def write_log_step(root: str, rows: int, batch: int, files: list[str]) -> dict:
    """``rows`` predictions appended with opensig's writer, ``batch`` per append (one file);
    only the appends are timed, not making up the rows."""
    from opensig.monitoring.log import PredictionLog

    rng = np.random.default_rng(0)
    writer = PredictionLog(root, NAME, "1")
    figures = {"seconds": 0.0, "rss_before_bytes": _peak_rss()}
    for first in tqdm(range(0, rows, batch), desc="prediction log", disable=None):
        frame, sources = _log_batch(rng, first, min(batch, rows - first), files, rows)
        start = time.perf_counter()
        writer.append(frame, sources)
        figures["seconds"] += time.perf_counter() - start
    return figures | {"rows": rows, "files": -(-rows // batch)}


def read_log_step(root: str) -> dict:
    """``read_log`` alone: the part of monitor and review export that grows with the log."""
    from opensig.monitoring.log import read_log

    figures: dict = {}
    with clock(figures):
        frame = read_log(root)
    return figures | {"rows": len(frame), "frame_bytes": int(frame.memory_usage(deep=True).sum())}


def monitor_step(root: str, settings: MonitorConfig, tracking_uri: str, out: Path) -> dict:
    """``monitor_log``, what ``opensig monitor`` runs: read the log, compare the windows,
    draw the pictures, log to MLflow. The MLflow store is created before the clock."""
    from mlflow import MlflowClient

    from opensig.monitoring.monitor import monitor_log

    MlflowClient(tracking_uri).search_experiments()  # a new SQLite store migrates once
    store = MlflowConfig(tracking_uri=tracking_uri, experiment=NAME)
    figures: dict = {}
    with clock(figures):
        report = monitor_log(root, settings, store, out)
    return figures | {"status": report["status"]}


def review_step(root: str, out: Path, data_root: Path, max_images: int, cache: Path) -> dict:
    """``export_from_log``, what ``opensig review export`` runs: read the log, scan the data
    folder (its probe cache warm) to leave out what is there, pick and copy the images."""
    from opensig.review import INBOX, export_from_log

    figures: dict = {}
    with clock(figures):
        batch = export_from_log(root, out, data_root, max_images, cache=cache)
    return figures | {"copied": sum(1 for p in (batch / INBOX).rglob("*") if p.is_file())}


# -- the benchmark -----------------------------------------------------------------------


def _step(results: dict, name: str, figures: dict, items: int) -> dict:
    """Record ``figures`` of ``name`` with its per-item cost, and say it in the log."""
    figures = {"items": items, **figures}
    figures["us_per_item"] = figures["seconds"] / items * 1e6
    figures["items_per_s"] = items / figures["seconds"]
    results["steps"][name] = figures
    log.info(
        "%s: %d items in %.1f s (%.0f us each, %.0f/s), peak RSS %.0f MB",
        name,
        items,
        figures["seconds"],
        figures["us_per_item"],
        figures["items_per_s"],
        figures["peak_rss_bytes"] / 1e6,
    )
    return figures


def dvc_disk(repo: Path, clone: Path, remote: Path) -> dict:
    """What DVC keeps for the tree: its cache, the remote, the clone's cache, its state outside
    the repository (site cache, removed once measured: DVC would leave it behind for every
    run's new repository), and the size of the one object listing every file (.dir)."""
    import yaml

    md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    listing = (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).stat()
    disk = {
        "dvc_cache": footprint(repo / ".dvc" / "cache"),
        "remote": footprint(remote),
        "clone_dvc_cache": footprint(clone / ".dvc" / "cache"),
        "dvc_dir_object": {
            "files": 1,
            "bytes": listing.st_size,
            "disk_bytes": listing.st_blocks * 512,
        },
    }
    for name, where in (("dvc_site_cache", repo), ("dvc_site_cache_clone", clone)):
        folder = site_cache(where)
        disk[name] = footprint(folder) | {"path": str(folder)}
        shutil.rmtree(folder)
    return disk


def _dvc_steps(results: dict, repo: Path, remote: Path, logs: Path, files: int) -> None:
    """The first ``dvc add``, ``status`` and ``push`` of the tree, committed to git."""
    _git("init", "-q", cwd=repo)
    for args in (("init", "-q"), ("remote", "add", "-d", "bench", str(remote.resolve()))):
        run_command(_dvc(*args), repo, logs)
    _step(results, "dvc add data", run_command(_dvc("add", "-q", "data"), repo, logs), files)
    _step(results, "dvc status (unchanged)", run_command(_dvc("status", "-q"), repo, logs), files)
    _step(results, "dvc push", run_command(_dvc("push", "-q"), repo, logs), files)
    _git("add", "-A", cwd=repo)
    _git("commit", "-q", "-m", "data", cwd=repo)


def _dvc_update(results: dict, repo: Path, logs: Path, files: int, added: int) -> None:
    """``dvc add`` and ``push`` after new files: what each retrain with new data pays. Per
    file of the whole tree (each is looked at), the number added beside it."""
    add = run_command(_dvc("add", "-q", "data"), repo, logs)
    _step(results, "dvc add data, after adding files", add | {"added": added}, files)
    push = run_command(_dvc("push", "-q"), repo, logs)
    _step(results, "dvc push, after adding files", push | {"added": added}, files)
    _git("add", "-A", cwd=repo)
    _git("commit", "-q", "-m", "more data", cwd=repo)


def run_ingest_scale(base_cfg: Config, opts: IngestScaleOptions) -> dict:
    """Every step once, its per-item cost and peak RSS; JSON and Markdown in ``opts.out``."""
    from opensig.bench.common import environment  # imports torch: not in the steps' processes

    check(opts)
    work = opts.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    repo, logs = work / "repo", work / "logs"
    data = repo / "data"
    added = opts.added or max(1, opts.files // 100)
    cfg = base_cfg.model_copy(
        update={
            "data": base_cfg.data.model_copy(
                update={"root": data, "cache_dir": work / "cache", "holdout_unknown": [SOURCES[1]]}
            )
        }
    )
    results: dict = {
        "meta": {
            "options": {k: str(v) for k, v in asdict(opts).items()},
            "added": added,
            "image": f"{SIZE}x{SIZE} grayscale PNG, stored (zlib level 0)",
            "folders": list(FOLDERS),
        },
        "environment": environment(),
        "steps": {},
    }
    base = base_images()
    written = write_tree(data, base, range(opts.files))
    results["write_tree"] = written | {"footprint": footprint(data)}
    log.info("wrote %d files in %.1f s (not opensig's cost)", opts.files, written["seconds"])

    first = in_child(ingest_step, cfg=cfg, out=work / "ingest")
    _step(results, "ingest, first run", first, opts.files)
    rerun = in_child(ingest_step, cfg=cfg, out=work / "ingest")
    _step(results, "ingest, re-run (unchanged)", rerun, opts.files)
    if opts.dvc:
        _dvc_steps(results, repo, work / "remote", logs, opts.files)

    write_tree(data, base, range(opts.files, opts.files + added))
    more = in_child(ingest_step, cfg=cfg, out=work / "ingest")
    _step(results, "ingest, after adding files", more | {"added": added}, opts.files + added)
    if opts.dvc:
        _dvc_update(results, repo, logs, opts.files + added, added)
        clone = work / "clone"
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
        pull = run_command(_dvc("pull", "-q"), clone, logs)
        _step(results, "dvc pull (fresh clone)", pull, opts.files + added)
        results["disk"] = dvc_disk(repo, clone, work / "remote")
    results.setdefault("disk", {})["data"] = footprint(data)

    _log_steps(results, cfg, opts, work, base)
    opts.out.mkdir(parents=True, exist_ok=True)
    write_json(opts.out / "ingest-scale.json", results)
    (opts.out / "ingest-scale.md").write_text(to_markdown(results) + "\n")
    return results


def _log_steps(
    results: dict, cfg: Config, opts: IngestScaleOptions, work: Path, base: np.ndarray
) -> None:
    """Write the prediction log, then read it, monitor it and export a review batch."""
    incoming = work / "incoming"  # the newest logged images: files review export can copy
    # enough that the newest 'unknown' rows, review's first pick, are all files
    count = min(opts.log_rows, int(2 * opts.review_max / UNKNOWN_RATE))
    start = opts.files + 10 * opts.files  # never an index of the data tree
    write_tree(incoming, base, range(start, start + count))
    files = sorted(p.as_posix() for p in incoming.rglob("*.png"))
    root = str(work / "log")
    rows = opts.log_rows
    wrote = in_child(write_log_step, root=root, rows=rows, batch=opts.log_batch, files=files)
    _step(results, "prediction log: append", wrote, rows)
    results["disk"]["log"] = footprint(Path(root))
    _step(results, "prediction log: read_log", in_child(read_log_step, root=root), rows)
    half = max(rows // 2, 1)  # the log is written in one go: windows of rows, not of days
    monitor = in_child(
        monitor_step,
        root=root,
        settings=cfg.monitor.model_copy(update={"window": half, "reference_size": half}),
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        out=work / "reports" / "monitor.json",
    )
    _step(results, "opensig monitor (monitor_log)", monitor, rows)
    review = in_child(
        review_step,
        root=root,
        out=work / "review",
        data_root=cfg.data.root,
        max_images=opts.review_max,
        cache=cfg.data.cache_dir / "scan.parquet",
    )
    _step(results, "opensig review export (export_from_log)", review, rows)


def to_markdown(results: dict) -> str:
    """One row per step: items, time, per-item cost, rate, peak RSS (and what the step added
    to it, where known); then the bytes on disk."""
    from opensig.bench.common import markdown_table

    rows = [
        [
            name,
            f"{s['items']}",
            f"{s['seconds']:.1f}",
            f"{s['us_per_item']:.1f}",
            f"{s['items_per_s']:.0f}",
            f"{s['peak_rss_bytes'] / 1e6:.0f}",
            f"{(s['peak_rss_bytes'] - s['rss_before_bytes']) / 1e6:.0f}"
            if "rss_before_bytes" in s
            else "",
        ]
        for name, s in results["steps"].items()
    ]
    disk = [
        [
            name,
            f"{d['files']}",
            f"{d['bytes'] / 1e6:.1f}",
            f"{d['disk_bytes'] / 1e6:.1f}",
            f"{d['disk_bytes'] / max(1, d['files']):.0f}",
        ]
        for name, d in results["disk"].items()
    ]
    ingest = results["steps"]["ingest, re-run (unchanged)"]
    written = results["write_tree"]
    lines = [
        f"{written['files']} files written in {written['seconds']:.0f} s (not timed as opensig's); "
        f"{results['environment']['machine']}, {results['environment']['cpu_count']} cores.",
        "",
        *markdown_table(
            ["step", "items", "s", "us / item", "items / s", "peak RSS MB", "step's own MB"], rows
        ),
        "",
        *markdown_table(["on disk", "files", "MB", "MB on disk", "disk bytes / file"], disk),
        "",
        f"Manifest {ingest['manifest_bytes'] / ingest['kept']:.0f} B / image, probe cache "
        f"{ingest['scan_cache_bytes'] / ingest['files']:.0f} B / file, ingest report "
        f"{ingest['report_bytes']} B.",
    ]
    return "\n".join(lines)
