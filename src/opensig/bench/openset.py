"""Open-set benchmark: every training method on one data set and split, at the same budget.

Each (method, seed) run goes through the same train -> tune -> evaluate code as the
pipeline, in a folder of its own, and is logged as an MLflow run in one experiment so the
MLflow UI compares them side by side. The summary is a Markdown and a JSON table.

Fashion-MNIST protocol: known = T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal; unknown
in training = Shirt, Sneaker; novel unknowns (test only) = Bag, Ankle boot. Train/val come
from the official train set (``per_class`` images per class, split 85/15 by content hash),
test is the official test set of all ten classes.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from opensig.bench import budget_params, environment
from opensig.config import Config, parse_config
from opensig.data import demo
from opensig.data.manifest import write_manifest
from opensig.data.scan import UNKNOWN_LABEL, scan_folder
from opensig.data.split import assign_splits
from opensig.io import atomic_write, read_json, write_json
from opensig.methods import METHODS
from opensig.stages import Layout, evaluate, train, tune

log = logging.getLogger(__name__)

COLUMNS = {  # result key -> table header
    "known_accuracy": "known acc",
    "macro_f1": "macro-F1",
    "unknown_recall": "unknown recall",
    "novel.auroc": "novel AUROC",
    "novel.fpr95": "novel FPR95",
    "novel.oscr": "novel OSCR",
    "train_seconds": "train s",
}
HFLIP = {"fashion-mnist": True, "digits": False}  # digits are not mirror-symmetric


@dataclass
class BenchOptions:
    dataset: str = "fashion-mnist"
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    epochs: int = 8
    backbone: str = "resnet18"
    image_size: int = 28
    in_chans: int = 1
    batch_size: int = 128
    device: str = "auto"
    per_class: int | None = 1000
    test_per_class: int | None = None
    work: Path = Path("bench/work")
    out: Path = Path("bench/results")


def prepare_manifest(opts: BenchOptions) -> pd.DataFrame:
    """Write the data set under ``work/data`` and split it by the protocol."""
    data = opts.work / "data"
    shutil.rmtree(data, ignore_errors=True)
    if opts.dataset == "digits":
        demo.write_digits(data)
        records = scan_folder(data).records
        return assign_splits(records, 0.15, 0.15, demo.DIGITS_HOLDOUT)
    if opts.dataset != "fashion-mnist":
        raise ValueError(f"--dataset {opts.dataset!r}: use fashion-mnist or digits")
    trained = [c for c in demo.FASHION_CLASSES if c not in demo.FASHION_HOLDOUT]
    demo.write_fashion_mnist(
        data / "train", per_class=opts.per_class, parts=("train",), classes=trained
    )
    demo.write_fashion_mnist(data / "test", per_class=opts.test_per_class, parts=("test",))
    train_val = assign_splits(scan_folder(data / "train").records, 0.15, 0.0, [])
    test = scan_folder(data / "test").records.assign(split="test")
    test["novel"] = (test["label"] == UNKNOWN_LABEL) & test["source"].isin(demo.FASHION_HOLDOUT)
    return pd.concat([train_val, test], ignore_index=True)


def run_config(base: Config, opts: BenchOptions, method: str, seed: int) -> Config:
    """The user's params with only the benchmark's shared budget and the method changed."""
    raw = budget_params(base, opts)
    raw["train"].update(method=method, seed=seed)
    raw["train"]["augment"]["hflip"] = HFLIP[opts.dataset]
    raw["data"]["root"] = str(opts.work / "data")  # where prepare_manifest wrote the images
    raw["mlflow"]["experiment"] = f"opensig-bench-{opts.dataset}"
    return parse_config(raw)


def run_one(cfg: Config, manifest: Path, run_dir: Path) -> dict:
    """Train, tune on val, evaluate on test; log one MLflow run (named, with its pictures, as
    a pipeline run is). Returns flat results."""
    from opensig.registry import flatten, logged_run

    at = Layout.under(run_dir)
    at.manifest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(manifest, at.manifest)
    train(cfg, at)
    tune(cfg, at)
    metrics = evaluate(cfg, at)
    metrics["train_seconds"] = read_json(at.train_report)["seconds"]
    tags = {"bench": "openset", "method": cfg.train.method, "seed": str(cfg.train.seed)}
    with logged_run(
        cfg,
        metrics,
        [*sorted(at.plots.glob("*.png")), at.metrics, at.train_report, at.thresholds],
        tags=tags,
        run_id=read_json(at.train_report)["mlflow_run_id"],  # the run training logged to
    ):
        pass
    return flatten(metrics)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds, one row per method (in run order)."""
    grouped = results.groupby("method", sort=False)[list(COLUMNS)]
    return grouped.mean().join(grouped.std(ddof=0).add_suffix("_std"))


def to_markdown(summary: pd.DataFrame, n_seeds: int) -> str:
    def cell(row: pd.Series, key: str) -> str:
        digits = 0 if key == "train_seconds" else 3
        text = f"{row[key]:.{digits}f}"
        return f"{text} ± {row[key + '_std']:.{digits}f}" if n_seeds > 1 else text

    lines = [
        "| method | " + " | ".join(COLUMNS.values()) + " |",
        "| --- |" + " ---: |" * len(COLUMNS),
    ]
    lines += [
        f"| {method} | " + " | ".join(cell(row, k) for k in COLUMNS) + " |"
        for method, row in summary.iterrows()
    ]
    return "\n".join(lines) + "\n"


def run_openset(base: Config, opts: BenchOptions) -> pd.DataFrame:
    """Every method x seed; writes ``openset_<dataset>.{json,md}`` under ``opts.out``."""
    unknown = sorted(set(opts.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    manifest = opts.work / "manifest.parquet"
    write_manifest(prepare_manifest(opts), manifest)
    rows = []
    for seed in opts.seeds:
        for method in opts.methods:
            log.info("bench %s: %s, seed %d", opts.dataset, method, seed)
            cfg = run_config(base, opts, method, seed)
            result = run_one(cfg, manifest, opts.work / "runs" / f"{method}-seed{seed}")
            rows.append({"method": method, "seed": seed, **result})
    results = pd.DataFrame(rows)
    summary = summarise(results)
    meta = {
        "dataset": opts.dataset,
        "seeds": opts.seeds,
        "epochs": opts.epochs,
        "backbone": opts.backbone,
        "image_size": opts.image_size,
        "in_chans": opts.in_chans,
        "batch_size": opts.batch_size,
        "per_class": opts.per_class,
        "test_per_class": opts.test_per_class,
        "device": opts.device,
        "train_defaults": base.model_dump(mode="json")["train"],
        **environment(),
    }
    stem = opts.out / f"openset_{opts.dataset}"
    write_json(
        stem.with_suffix(".json"),
        {
            "meta": meta,
            "summary": summary.reset_index().replace({np.nan: None}).to_dict(orient="records"),
            "runs": results.replace({np.nan: None}).to_dict(orient="records"),
        },
    )
    table = to_markdown(summary, len(opts.seeds))
    atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    return summary
