"""Scale benchmark: does `opensig predict --engine spark` use the cores it is given, and what
does the engine cost against one process?

Same images (Fashion-MNIST PNGs), same registered model (an untrained backbone: speed does
not depend on the weights), measured end to end as a user runs them, Spark's session start
excluded (a cluster has one already):

- local: ``opensig predict`` in this process (``predict_job``: model load, decoding,
  scoring, the CSV), torch on ``threads`` threads;
- Spark ``local[1]`` and ``local[2]``: ``predict_spark`` (model fetch, listing, one model
  load per Python worker, scoring on the executors, one torch thread per task, the
  Parquet output).

Rounds are interleaved (local, local[1], local[2], then again) so that a slow spell of the
machine hits every configuration alike; the tables give medians with their spread.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from opensig.batch import collect_images, predict_job
from opensig.bench.common import environment, markdown_table, summary
from opensig.bench.options import ScaleOptions
from opensig.config import MlflowConfig
from opensig.data import demo
from opensig.decision import THRESHOLDS_FILE, write_thresholds
from opensig.io import write_json
from opensig.model import build_spec, create_model, model_digest, save_model_dir
from opensig.tracking.promotion import ModelRegistry, log_and_register
from opensig.tracking.runs import RunSpec

log = logging.getLogger(__name__)

NAME = "opensig-bench-scale"
MASTERS = ("local[1]", "local[2]")


def check(opts: ScaleOptions) -> None:
    """Every option, before anything runs."""
    from opensig.spark import require_spark

    if opts.images < 10 or opts.rounds < 1 or opts.threads < 1 or opts.image_size < 16:
        raise ValueError(
            "bench scale: --images >= 10, --rounds >= 1, --threads >= 1, --image-size >= 16"
        )
    require_spark()
    if not demo.FASHION_DIR.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {demo.FASHION_DIR}: apt-get install dataset-fashion-mnist"
        )


def registered_model(opts: ScaleOptions, work: Path) -> tuple[str, MlflowConfig]:
    """An untrained ``opts.backbone`` for the six known Fashion-MNIST classes, registered in a
    SQLite store of its own: (its models:/ URI, that store)."""
    classes = list(demo.FASHION_KNOWN)
    net = create_model(opts.backbone, len(classes), 3)
    spec = build_spec(net, opts.backbone, classes, "sigmoid_bce", len(classes), opts.image_size, 3)
    bundle = work / "bundle"
    save_model_dir(bundle, net, spec)
    write_thresholds(
        bundle / THRESHOLDS_FILE,
        classes,
        [0.5] * len(classes),
        "fixed",
        {},
        model_sha256=model_digest(bundle),
    )
    store = MlflowConfig(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment=NAME)
    registry = ModelRegistry(store.tracking_uri, NAME, NAME)
    _, version = log_and_register(
        registry, RunSpec(NAME, "scale", {}), {}, bundle, bundle / THRESHOLDS_FILE, []
    )
    return f"models:/{NAME}/{version}", store


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timed_local(images: Path, out: Path, model: str, store: MlflowConfig, threads: int) -> float:
    """Images/s of ``opensig predict`` on ``images``, in this process."""
    with torch_threads(threads):
        start = time.perf_counter()
        result = predict_job([images], out, model=model, store=store, device="cpu")
        seconds = time.perf_counter() - start
    return len(result.frame) / seconds


def timed_spark(images: Path, out: Path, model: str, store: MlflowConfig, master: str) -> float:
    """Images/s of ``opensig predict --engine spark`` on ``master``, its session already up."""
    from opensig.spark import predict_spark, session

    session(master)  # started before the clock: a cluster's session is up already
    start = time.perf_counter()
    job = predict_spark([str(images)], str(out), model=model, store=store)
    seconds = time.perf_counter() - start
    session().stop()
    return job.written / seconds


def run_scale(opts: ScaleOptions) -> dict:
    """Every round of every configuration, their medians and spread; JSON and Markdown in
    ``opts.out``."""
    check(opts)
    work = opts.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    images = work / "images"
    demo.write_fashion_mnist(images, per_class=max(1, opts.images // len(demo.FASHION_CLASSES)))
    count = len(collect_images([images])[0])
    model, store = registered_model(opts, work)
    rounds = []
    for index in range(opts.rounds):
        log.info("scale round %d of %d on %d images", index + 1, opts.rounds, count)
        figures = {
            "local": timed_local(images, work / f"local-{index}.csv", model, store, opts.threads)
        }
        for master in MASTERS:
            out = work / f"spark-{master[6]}-{index}.parquet"
            figures[master] = timed_spark(images, out, model, store, master)
        figures["local[2] / local[1]"] = figures["local[2]"] / figures["local[1]"]
        figures["local[2] / local"] = figures["local[2]"] / figures["local"]
        rounds.append(figures)
        log.info("scale round %d: %s", index + 1, {k: round(v, 2) for k, v in figures.items()})
    results = {
        "meta": {"options": {k: str(v) for k, v in asdict(opts).items()}, "images": count},
        "environment": environment(),
        "rounds": rounds,
        "summary": summary(rounds),
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    write_json(opts.out / f"scale_{opts.image_size}px.json", results)
    (opts.out / f"scale_{opts.image_size}px.md").write_text(to_markdown(results) + "\n")
    return results


def to_markdown(results: dict) -> str:
    """The medians with their spread (min-max), then every round."""
    figures = results["summary"]
    rows = []
    for key in ("local", *MASTERS, "local[2] / local[1]", "local[2] / local"):
        low, high = figures["spread"][key]
        digits = 2 if "/" in key else 0
        rows.append([key, f"{figures[key]:.{digits}f}", f"{low:.{digits}f}-{high:.{digits}f}"])
    every = [
        [str(i + 1), *(f"{r[k]:.0f}" for k in ("local", *MASTERS)), f"{r['local[2] / local']:.2f}"]
        for i, r in enumerate(results["rounds"])
    ]
    lines = [
        f"{results['meta']['images']} images; medians of {len(results['rounds'])} interleaved "
        "rounds with their spread (min-max); images/s, Spark session start excluded.",
        "",
        *markdown_table(["measure", "images/s or ratio", "min-max"], rows),
        "",
        *markdown_table(["round", "local", *MASTERS, "local[2] / local"], every),
    ]
    return "\n".join(lines)
