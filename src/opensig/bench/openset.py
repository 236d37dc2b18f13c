"""Open-set benchmark: every training method and feature score on one data set, same budget.

Each (method, seed) run trains once through the pipeline's train stage, then goes through
tune -> evaluate once per feature score (``none``: the head's scores alone; ``mahalanobis``,
``knn``: the post-hoc scores of :mod:`opensig.posthoc`), each in a folder of its own and
logged as an MLflow run in one experiment, so the MLflow UI compares them side by side. The
summary is a Markdown and a JSON table.

Fashion-MNIST protocol: known = T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal; unknown
in training = Shirt, Sneaker; novel unknowns (test only) = Bag, Ankle boot. Train/val come
from the official train set (``per_class`` images per class, split 85/15 by content hash),
test is the official test set of all ten classes. ``splits`` > 0 replaces the fixed split
of the classes by that many random ones (6 known / 2 unknown in training / 2 novel, drawn
from a seeded generator), as open-set papers do with CIFAR-10's 6/4 splits. ``near`` keeps
the known classes and swaps the others: the novel ones are those nearest the known classes
in the default network's feature space, the training unknowns the farthest (``NEAR_PROTOCOL``),
the usual case in practice, where the "other" folder holds what was easy to collect.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from opensig.bench.common import budget_params, environment
from opensig.bench.options import BenchOptions, WarmStartOptions
from opensig.config import Config, parse_config
from opensig.data import demo
from opensig.data.manifest import write_manifest
from opensig.data.scan import scan_folder
from opensig.data.split import assign_splits
from opensig.io import atomic_write, read_json, write_json
from opensig.labels import UNKNOWN_LABEL
from opensig.methods import METHODS
from opensig.posthoc import FEATURE_SCORES
from opensig.stages import Layout, evaluate, train, tune

log = logging.getLogger(__name__)

COLUMNS = {  # result key -> table header
    "known_accuracy": "known acc",
    "macro_f1": "macro-F1",
    "unknown_recall": "unknown recall",
    "val_auroc": "val AUROC",
    "novel.auroc": "novel AUROC",
    "novel.fpr95": "novel FPR95",
    "novel.oscr": "novel OSCR",
    "threshold_min": "lowest threshold",
    "threshold_max": "highest threshold",
    "train_seconds": "train s",
}
HFLIP = {"fashion-mnist": True, "digits": False}  # digits are not mirror-symmetric
ROW = ["method", "feature_score"]  # what a table row is: a training method and a score


@dataclass(frozen=True)
class ClassSplit:
    """Which classes are known, unknown in training, and novel (test only)."""

    known: tuple[str, ...]
    unknown: tuple[str, ...]
    novel: tuple[str, ...]


PROTOCOL = {
    "fashion-mnist": ClassSplit(demo.FASHION_KNOWN, ("shirt", "sneaker"), demo.FASHION_HOLDOUT),
    "digits": ClassSplit(demo.DIGITS_KNOWN, ("6", "7"), demo.DIGITS_HOLDOUT),
}
# Novel classes next to known ones, the unknown folder holding only the far-away ones: chosen
# once (2026-12-05) by the median squared Mahalanobis distance of each other class's test
# images to the nearest known class, in the features of the default recipe trained on the
# known classes alone (seed 0), so that no candidate's distance is one its own training
# shaped: sneaker 329, shirt 655, ankle boot 877, bag 3643 (bench/README.md). Fixed since.
NEAR_PROTOCOL = {
    "fashion-mnist": ClassSplit(demo.FASHION_KNOWN, ("ankle_boot", "bag"), ("shirt", "sneaker")),
}
ALL_CLASSES = {"fashion-mnist": demo.FASHION_CLASSES, "digits": demo.DIGITS_CLASSES}


def class_splits(classes: tuple[str, ...], count: int, seed: int = 0) -> list[ClassSplit]:
    """``count`` random 6/2/2 splits of ten classes, the i-th drawn with seed (seed, i): the
    same splits on every machine, and adding splits keeps the earlier ones."""
    splits = []
    for index in range(count):
        order = np.random.default_rng([seed, index]).permutation(len(classes))
        chosen = [tuple(sorted(classes[i] for i in part)) for part in np.split(order, [6, 8])]
        splits.append(ClassSplit(*chosen))
    return splits


def checked(opts: BenchOptions) -> BenchOptions:
    """``opts`` with the methods and feature scores left at None (all) spelled out; a bad
    option is refused before anything runs (a typo must not cost a training)."""
    methods = list(METHODS) if opts.methods is None else opts.methods
    scores = list(FEATURE_SCORES) if opts.feature_scores is None else opts.feature_scores
    if opts.dataset not in PROTOCOL:
        raise ValueError(f"--dataset {opts.dataset!r}: use one of {sorted(PROTOCOL)}")
    if opts.near and (opts.splits or opts.dataset not in NEAR_PROTOCOL):
        raise ValueError(f"--near: one fixed split, of {sorted(NEAR_PROTOCOL)}; drop --splits")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--method: unknown {unknown}; choose from {list(METHODS)}")
    bad_scores = sorted(set(scores) - set(FEATURE_SCORES))
    if bad_scores or not scores:
        raise ValueError(f"--feature-score: {bad_scores}; choose from {list(FEATURE_SCORES)}")
    if opts.splits < 0 or opts.seeds < 1 or opts.first_seed < 0:
        raise ValueError("--splits and --first-seed must be 0 or more and --seeds at least 1")
    return replace(opts, methods=methods, feature_scores=scores)


def prepare_manifest(
    opts: BenchOptions | WarmStartOptions, split: ClassSplit, work: Path
) -> pd.DataFrame:
    """Write the data set under ``work/data`` and split it by the protocol."""
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    if opts.dataset == "digits":
        demo.write_digits(data, known=split.known)
        records = scan_folder(data).records
        return assign_splits(records, 0.15, 0.15, list(split.novel))
    demo.write_fashion_mnist(
        data / "train",
        per_class=opts.per_class,
        parts=("train",),
        classes=split.known + split.unknown,
        known=split.known,
    )
    demo.write_fashion_mnist(
        data / "test", per_class=opts.test_per_class, parts=("test",), known=split.known
    )
    train_val = assign_splits(scan_folder(data / "train").records, 0.15, 0.0, [])
    test = scan_folder(data / "test").records.assign(split="test")
    test["novel"] = (test["label"] == UNKNOWN_LABEL) & test["source"].isin(split.novel)
    return pd.concat([train_val, test], ignore_index=True)


def run_config(
    base: Config,
    opts: BenchOptions | WarmStartOptions,
    method: str,
    seed: int,
    work: Path,
    feature_score: str | None = None,
) -> Config:
    """The user's params with only the benchmark's shared budget, the method and the feature
    score changed; the data are those ``prepare_manifest`` wrote under ``work``."""
    raw = budget_params(base, opts)  # one decode cache for every split: keyed by content
    raw["train"].update(method=method, seed=seed)
    raw["train"]["augment"]["hflip"] = HFLIP[opts.dataset]
    if feature_score is not None:
        raw["tune"]["feature_score"] = feature_score
    raw["data"]["root"] = str(work / "data")
    raw["mlflow"]["experiment"] = f"opensig-bench-{opts.dataset}"
    return parse_config(raw)


def validation_auroc(cfg: Config, at: Layout) -> float:
    """Known vs unknown AUROC on the val split (the training kinds of unknown): the figure
    a score may be chosen by, since test's novel unknowns must not choose anything."""
    from opensig.data.manifest import read_manifest, split_rows
    from opensig.evaluation import evaluate_bundle
    from opensig.predict import Bundle

    bundle = Bundle.load(at.model_dir, at.thresholds, cfg.train.device)
    rows = split_rows(read_manifest(at.manifest, cfg.data.root), "val")
    return evaluate_bundle(bundle, rows, cfg.evaluate.batch_size).metrics["auroc"]


def cross_check_run(cfg: Config, at: Layout) -> list[dict]:
    """pytorch-ood's detectors on the trained network (:mod:`opensig.bench.crosscheck`)."""
    from opensig.bench.crosscheck import cross_check
    from opensig.data.manifest import read_manifest, split_rows
    from opensig.model import load_model_dir, resolve_device

    model, spec = load_model_dir(at.model_dir, resolve_device(cfg.train.device))
    manifest = read_manifest(at.manifest, cfg.data.root)
    rows = [split_rows(manifest, split) for split in ("train", "val", "test")]
    return cross_check(model, spec, *rows, batch_size=cfg.evaluate.batch_size)


def run_one(
    cfg: Config,
    manifest: Path,
    run_dir: Path,
    feature_scores: list[str],
    tags: dict[str, str],
    cross_check: bool = False,
    pictures: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Train once; then tune on val and evaluate on test with each feature score, each
    logged as an MLflow run (the first into the training's own run), with its pictures
    unless ``pictures`` is off. Flat results, one per feature score, and with
    ``cross_check`` one per pytorch-ood detector."""
    from opensig.tracking.runs import RunSpec, flatten, logged_run
    from opensig.tracking.store import tracking_uri

    at = Layout.under(run_dir)
    at.manifest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(manifest, at.manifest)
    train(cfg, at)
    report = read_json(at.train_report)
    rows = []
    for index, score in enumerate(feature_scores):
        scored = parse_config(
            {
                **cfg.model_dump(mode="json"),
                "tune": {**cfg.tune.model_dump(), "feature_score": score},
            }
        )
        folder = run_dir / f"score-{score}"
        variant = replace(
            at,
            thresholds=folder / "thresholds.json",
            metrics=folder / "metrics.json",
            plots=folder / "plots",
        )
        tuned = list(tune(scored, variant)["thresholds"].values())
        metrics = evaluate(scored, variant, pictures)
        metrics["val_auroc"] = validation_auroc(scored, variant)
        metrics["train_seconds"] = report["seconds"]
        metrics["threshold_min"], metrics["threshold_max"] = min(tuned), max(tuned)
        run_tags = {**tags, "method": cfg.train.method, "seed": str(cfg.train.seed)}
        with logged_run(
            tracking_uri(scored.mlflow),
            RunSpec.of(scored),
            metrics,
            [*sorted(variant.plots.glob("*.png")), variant.metrics, at.train_report],
            tags={**run_tags, "feature_score": score},
            run_id=report["mlflow_run_id"] if index == 0 else None,  # the run training logged
        ):
            pass
        rows.append({"feature_score": score, **flatten(metrics)})
    return rows, cross_check_run(cfg, at) if cross_check else []


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds (and class splits), one row per method and
    feature score, in run order."""
    grouped = results.groupby(ROW, sort=False)[list(COLUMNS)]
    return grouped.mean().join(grouped.std(ddof=0).add_suffix("_std"))


PAIRED = {  # result key -> header, for the paired comparison
    "macro_f1": "macro-F1",
    "novel.auroc": "novel AUROC",
    "novel.fpr95": "novel FPR95",
    "novel.oscr": "novel OSCR",
}


def mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval (lo, hi) of paired differences; NaN interval for one pair,
    all NaN for none."""
    from scipy import stats

    values = values[~np.isnan(values)]
    mean = float(values.mean()) if values.size else np.nan
    half = np.nan
    if values.size > 1:
        half = float(stats.t.ppf(0.975, values.size - 1) * stats.sem(values))
    return mean, mean - half, mean + half


def interval_columns(diff: pd.DataFrame, keys: Iterable[str]) -> dict[str, float]:
    """``key``, ``key_lo``, ``key_hi`` for each column of paired differences."""
    row = {}
    for key in keys:
        mean, lo, hi = mean_interval(diff[key].to_numpy(dtype=float))
        row |= {key: mean, f"{key}_lo": lo, f"{key}_hi": hi}
    return row


def paired_differences(results: pd.DataFrame, default: tuple[str, str]) -> pd.DataFrame:
    """Per (method, feature score), its result minus the default's on the same class split
    and seed: mean and 95% t-interval of the differences (the seeds and splits are what
    varies, so they are the pairs)."""
    keys = ["split", "seed"]
    base = results[(results["method"] == default[0]) & (results["feature_score"] == default[1])]
    base = base.set_index(keys)[list(PAIRED)]
    rows = []
    for (method, score), group in results.groupby(ROW, sort=False):
        if (method, score) == default:
            continue
        diff = group.set_index(keys)[list(PAIRED)] - base
        rows.append(
            {"method": method, "feature_score": score, "pairs": len(diff)}
            | interval_columns(diff, PAIRED)
        )
    return pd.DataFrame(rows).set_index(ROW) if rows else pd.DataFrame()


def paired_markdown(paired: pd.DataFrame, columns: dict[str, str] = PAIRED) -> str:
    """The paired differences as a table, one column per ``columns`` key."""
    lines = [
        "| method | feature score | pairs | " + " | ".join(columns.values()) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(columns),
    ]
    for (method, score), row in paired.iterrows():
        cells = []
        for key in columns:
            text = f"{row[key]:+.3f}"
            if not np.isnan(row[f"{key}_lo"]):
                text += f" [{row[f'{key}_lo']:+.3f}, {row[f'{key}_hi']:+.3f}]"
            cells.append(text)
        lines.append(f"| {method} | {score} | {int(row['pairs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cross_check_markdown(results: pd.DataFrame, checks: pd.DataFrame, score: str) -> str:
    """Per method: opensig's ``score`` beside the pytorch-ood detector with the best mean
    validation AUROC (chosen on val, never on test), and the best of them on test; methods
    without a cross-check are left out."""
    lines = [
        "| method | score | val AUROC | novel AUROC | novel FPR95 | novel OSCR |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    columns = ["val_auroc", "novel.auroc", "novel.fpr95", "novel.oscr"]
    for method in results["method"].unique():
        own = results[(results["method"] == method) & (results["feature_score"] == score)]
        found = checks[checks["method"] == method].rename(
            columns={"auroc": "novel.auroc", "fpr95": "novel.fpr95", "oscr": "novel.oscr"}
        )
        if found.empty:  # run without the cross-check (a merged file may hold both)
            continue
        means = found.groupby("detector")[columns].mean()
        chosen = means["val_auroc"].idxmax()
        best_test = means["novel.auroc"].idxmax()
        entries = [(f"opensig {score}", own[columns].mean())]
        entries.append((f"pytorch-ood {chosen} (best on val)", means.loc[chosen]))
        if best_test != chosen:
            entries.append((f"pytorch-ood {best_test} (best on test)", means.loc[best_test]))
        for name, values in entries:
            cells = " | ".join(f"{values[c]:.3f}" for c in columns)
            lines.append(f"| {method} | {name} | {cells} |")
    return "\n".join(lines) + "\n"


def to_markdown(summary: pd.DataFrame, n_runs: int, default: tuple[str, str] | None = None) -> str:
    """The table; ``default`` (method, feature score) is the row marked as opensig's."""

    def cell(row: pd.Series, key: str) -> str:
        digits = 0 if key == "train_seconds" else 3
        text = f"{row[key]:.{digits}f}"
        return f"{text} ± {row[key + '_std']:.{digits}f}" if n_runs > 1 else text

    lines = [
        "| method | feature score | " + " | ".join(COLUMNS.values()) + " |",
        "| --- | --- |" + " ---: |" * len(COLUMNS),
    ]
    for (method, score), row in summary.iterrows():
        name = f"**{method}** (opensig default)" if (method, score) == default else method
        lines.append(f"| {name} | {score} | " + " | ".join(cell(row, k) for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def splits_markdown(splits: list[ClassSplit]) -> str:
    """The class splits a table was measured on."""
    lines = [
        "| split | known | unknown in training | novel (test only) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {i} | {', '.join(s.known)} | {', '.join(s.unknown)} | {', '.join(s.novel)} |"
        for i, s in enumerate(splits)
    ]
    return "\n".join(lines) + "\n"


def run_openset(base: Config, opts: BenchOptions) -> tuple[pd.DataFrame, str]:
    """Every split x seed x method x feature score; writes ``openset_<dataset>.{json,md}``
    (``openset_<dataset>_splits.{json,md}`` with class splits) under ``opts.out``.
    Returns the summary and its Markdown."""
    opts = checked(opts)
    fixed = (NEAR_PROTOCOL if opts.near else PROTOCOL)[opts.dataset]
    splits = class_splits(ALL_CLASSES[opts.dataset], opts.splits) if opts.splits else [fixed]
    seeds = list(range(opts.first_seed, opts.first_seed + opts.seeds))
    rows: list[dict] = []
    checks: list[dict] = []
    for index, split in enumerate(splits):
        work = opts.work / f"split{index}" if opts.splits else opts.work
        manifest = work / "manifest.parquet"
        write_manifest(prepare_manifest(opts, split, work), manifest)
        for seed in seeds:
            for method in opts.methods:
                log.info("bench %s split %d: %s, seed %d", opts.dataset, index, method, seed)
                cfg = run_config(base, opts, method, seed, work)
                tags = {
                    "bench": "openset",
                    "class_split": str(index),
                    "known": ",".join(split.known),
                }
                scored, detected = run_one(
                    cfg,
                    manifest,
                    work / "runs" / f"{method}-seed{seed}",
                    opts.feature_scores,
                    tags,
                    opts.cross_check,
                    opts.pictures,
                )
                run = {"split": index, "method": method, "seed": seed}
                rows += [{**run, **result} for result in scored]
                checks += [{**run, **result} for result in detected]
    meta = {
        "dataset": opts.dataset,
        "seeds": seeds,
        "class_splits": [vars(s) for s in splits],
        "random_splits": opts.splits > 0,
        "near": opts.near,
        "feature_scores": opts.feature_scores,
        "epochs": opts.epochs,
        "backbone": opts.backbone,
        "image_size": opts.image_size,
        "in_chans": opts.in_chans,
        "batch_size": opts.batch_size,
        "per_class": opts.per_class,
        "test_per_class": opts.test_per_class,
        "device": opts.device,
        "train_defaults": base.model_dump(mode="json")["train"],
        "tune_defaults": base.model_dump(mode="json")["tune"],
        **environment(),
    }
    return write_results(opts.out, meta, pd.DataFrame(rows), pd.DataFrame(checks))


def write_results(
    out: Path, meta: dict, results: pd.DataFrame, checks: pd.DataFrame
) -> tuple[pd.DataFrame, str]:
    """``openset_<dataset>[_splits|_near].{json,md}`` under ``out`` from every run's results
    (and pytorch-ood's, ``checks``): the summary, the paired differences from the default
    (``meta``'s train method and tune feature score), the cross-check and the class splits.
    Returns the summary and its Markdown."""
    splits = [ClassSplit(**{k: tuple(v) for k, v in s.items()}) for s in meta["class_splits"]]
    summary = summarise(results)
    default = (meta["train_defaults"]["method"], meta["tune_defaults"]["feature_score"])
    paired = paired_differences(results, default)
    suffix = "_splits" if meta["random_splits"] else "_near" if meta["near"] else ""
    stem = out / f"openset_{meta['dataset']}{suffix}"
    write_json(
        stem.with_suffix(".json"),
        {
            "meta": meta,
            "summary": summary.reset_index().replace({np.nan: None}).to_dict(orient="records"),
            "runs": results.replace({np.nan: None}).to_dict(orient="records"),
            "paired": paired.reset_index().replace({np.nan: None}).to_dict(orient="records"),
            "cross_check": checks.to_dict(orient="records"),
        },
    )
    runs = len(results[["split", "seed"]].drop_duplicates())
    table = to_markdown(summary, runs, default)
    table += "\nPaired differences, each row minus the default (" + " + ".join(default) + "), "
    table += "over the same seeds and class splits: mean [95% interval]\n\n"
    table += paired_markdown(paired)
    if not checks.empty:
        table += "\nIndependent check (pytorch-ood 0.4.0 on the same networks):\n\n"
        table += cross_check_markdown(results, checks, default[1])
    if meta["random_splits"] or meta["near"]:
        table += "\nClass splits:\n\n" + splits_markdown(splits)
    atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    return summary, table
