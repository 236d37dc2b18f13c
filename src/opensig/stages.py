"""One thin function per DVC stage: read config and inputs, call the library, write outputs.

Each reads like its entry in dvc.yaml; the paths below are the ones dvc.yaml declares.
A stage imports the heavy libraries it uses (torch and timm, mlflow, matplotlib) inside its
function: ``opensig ingest`` starts in under a second instead of paying for all of them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from opensig.config import Config
from opensig.data.labels_csv import scan_csv
from opensig.data.manifest import (
    is_multi_label,
    read_manifest,
    split_rows,
    write_manifest,
)
from opensig.data.scan import scan_cache, scan_folder
from opensig.data.split import (
    assign_splits,
    check_trainable,
    small_test_warnings,
    split_summary,
)
from opensig.io import read_json, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes: the paths dvc.yaml declares.

    The CLI uses them as they are, relative to the working directory; the benchmark gives
    every run a folder of its own with ``Layout.under(folder)``.
    """

    manifest: Path = Path("artifacts/manifest.parquet")
    model_dir: Path = Path("artifacts/model")
    last_dir: Path = Path("artifacts/checkpoints/last")
    thresholds: Path = Path("artifacts/thresholds.json")
    ingest_report: Path = Path("reports/ingest.json")
    train_report: Path = Path("reports/train.json")
    train_metrics: Path = Path("reports/train_metrics.json")
    train_plots: Path = Path("reports/train")
    metrics: Path = Path("reports/metrics.json")
    plots: Path = Path("reports/plots")
    registered: Path = Path("reports/registered.json")

    @classmethod
    def under(cls, root: Path) -> Layout:
        return cls(**{name: root / path for name, path in asdict(cls()).items()})


HERE = Layout()


def ingest(cfg: Config, at: Layout = HERE) -> dict:
    """data/ -> manifest (path, hash, label, source, split, novel) + report of what was skipped."""
    options = {
        "cache": scan_cache(cfg.data.cache_dir),
        "max_pixels": cfg.data.max_image_pixels,
    }
    scan = (
        scan_csv(cfg.data.root, cfg.data.labels_csv, **options)
        if cfg.data.labels_csv
        else scan_folder(cfg.data.root, **options)
    )
    manifest = assign_splits(
        scan.records,
        cfg.data.val_fraction,
        cfg.data.test_fraction,
        cfg.data.holdout_unknown,
        cfg.data.split_seed,
    )
    check_trainable(manifest)
    splits = split_summary(manifest)
    write_manifest(manifest, at.manifest)
    report = {
        "root": cfg.data.root,
        "classes": scan.classes,
        "images": len(manifest),
        "files": scan.counts(),
        "warnings": scan.warnings + splits["warnings"],
        "splits": splits,
        "skipped": scan.skipped,
        "duplicates": scan.duplicates,
        "conflicts": scan.conflicts,
    }
    write_json(at.ingest_report, report)
    log.info(
        "ingest: %s; %d warning(s); every skipped file and why: %s",
        ", ".join(f"{n} {what}" for what, n in scan.counts().items()),
        len(report["warnings"]),
        at.ingest_report,
    )
    return report


def init_source(cfg: Config) -> str:
    """train.init_from as a model reference: `champion` is the registered model's champion."""
    if cfg.train.init_from == "champion":
        return f"models:/{cfg.mlflow.registered_model}@champion"
    return str(cfg.train.init_from)


def train(cfg: Config, at: Layout = HERE) -> dict:
    """Also the entry point of `torchrun -m opensig train`: every process trains, rank 0 writes
    and logs each epoch to an MLflow run, whose id register reads from the report."""
    from opensig.model import model_digest
    from opensig.plots import write_history
    from opensig.tracking.model_uri import resolve_model_dir
    from opensig.tracking.runs import TRAIN_SECTIONS, RunSpec, TrainingRun
    from opensig.tracking.store import tracking_uri
    from opensig.train import is_main_process, train_model

    manifest = read_manifest(at.manifest, cfg.data.root)
    init_dir = None
    if cfg.train.init_from is not None:
        init_dir = resolve_model_dir(init_source(cfg), tracking_uri(cfg.mlflow))
    with TrainingRun(cfg.mlflow, RunSpec.of(cfg, TRAIN_SECTIONS)) as mlflow_run:
        result = train_model(cfg, manifest, at.model_dir, at.last_dir, mlflow_run, init_dir)
    if not is_main_process():
        return {}
    write_history(result.history, at.train_plots)
    report = {k: v for k, v in asdict(result).items() if k not in ("spec", "history")}
    report["classes"] = result.spec.classes
    report["mlflow_run_id"] = mlflow_run.run_id  # None: MLflow was unreachable
    if init_dir is not None:  # which model it started from: DVC cannot see a registry alias
        report["init_from"] = {"source": init_source(cfg), "sha256": model_digest(init_dir)}
    write_json(at.train_report, report)
    # The DVC metrics of training (`dvc exp show`): only what a person compares across runs.
    last = result.history[-1]
    write_json(
        at.train_metrics,
        {
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "final_train_loss": last["train_loss"],
            "final_val_loss": last["val_loss"],
        },
    )
    return report


def tune(cfg: Config, at: Layout = HERE) -> dict:
    """The feature score (fitted on train, calibrated on val) and per-class thresholds from
    the validation split (never from test)."""
    from opensig.decision import write_thresholds
    from opensig.model import load_model_dir, model_digest, resolve_device
    from opensig.tuning import fit_decision

    model, spec = load_model_dir(at.model_dir, resolve_device(cfg.train.device))
    manifest = read_manifest(at.manifest, cfg.data.root)
    val_rows = split_rows(manifest, "val")
    if val_rows.empty:
        raise ValueError(
            "the val split is empty: thresholds need validation images (raise data.val_fraction)"
        )
    options = {
        "target_precision": cfg.tune.target_precision,
        "value": cfg.tune.fixed_threshold,
        "doc_k": cfg.tune.doc_k,
    }
    values, feature_score = fit_decision(
        model=model,
        spec=spec,
        train_rows=split_rows(manifest, "train"),
        val_rows=val_rows,
        multi_label=is_multi_label(manifest["label"]),
        strategy=cfg.tune.strategy,
        options=options,
        feature_score=cfg.tune.feature_score,
        knn_k=cfg.tune.knn_k,
        feature_weight=cfg.tune.feature_weight,
        batch_size=cfg.evaluate.batch_size,
    )
    write_thresholds(
        at.thresholds,
        spec.classes,
        values,
        cfg.tune.strategy,
        options,
        model_sha256=model_digest(at.model_dir),
        feature_score=feature_score,
    )
    return {
        "strategy": cfg.tune.strategy,
        "feature_score": feature_score.describe() if feature_score else None,
        "thresholds": dict(zip(spec.classes, values.tolist(), strict=True)),
    }


def evaluate(cfg: Config, at: Layout = HERE, pictures: bool = True) -> dict:
    """Open-set metrics and plots on the test split (known, unknown and novel unknown images);
    ``pictures=False`` skips the PNGs and CSVs (the bench's quick runs: most of their time)."""
    from opensig.evaluation import evaluate_bundle
    from opensig.plots import write_pictures
    from opensig.predict import Bundle

    bundle = Bundle.load(at.model_dir, at.thresholds, cfg.train.device)
    manifest = read_manifest(at.manifest, cfg.data.root)
    multi_label = is_multi_label(manifest["label"])
    rows = split_rows(manifest, "test")
    for warning in small_test_warnings(rows):
        log.warning(warning)
    result = evaluate_bundle(bundle, rows, cfg.evaluate.batch_size, multi_label)
    if pictures:
        write_pictures(result, at.plots)
    write_json(at.metrics, result.metrics)
    log.info("evaluate: %s", {k: v for k, v in result.metrics.items() if k != "novel"})
    return result.metrics


def register(cfg: Config, at: Layout = HERE) -> dict:
    """Log metrics, reports and pictures to MLflow (into the training's run when it can),
    register the model, move the aliases, write registered.json.

    The gate judges the champion on today's test split and today's classes: a champion of
    another class set cannot name the new classes, and those images count as its mistakes.
    """
    from opensig.tracking.promotion import champion_judge, register_and_promote
    from opensig.tracking.store import connected

    metrics = read_json(at.metrics)
    train_run = (
        read_json(at.train_report).get("mlflow_run_id") if at.train_report.is_file() else None
    )
    pngs = sorted(at.plots.glob("*.png")) + sorted(at.train_plots.glob("*.png"))
    manifest = read_manifest(at.manifest, cfg.data.root)
    test_rows, multi_label = split_rows(manifest, "test"), is_multi_label(manifest["label"])
    # Bounded retries, a reachability check before anything is logged, redacted errors.
    with connected(cfg.mlflow) as tracking_uri:
        judge = champion_judge(
            tracking_uri=tracking_uri,
            name=cfg.mlflow.registered_model,
            rows=test_rows,
            multi_label=multi_label,
            device=cfg.train.device,
            batch_size=cfg.evaluate.batch_size,
        )
        out = register_and_promote(
            cfg,
            tracking_uri=tracking_uri,
            metrics=metrics,
            model_dir=at.model_dir,
            thresholds=at.thresholds,
            artifacts=[*pngs, at.metrics, at.ingest_report, at.train_report, at.thresholds],
            train_run=train_run,
            judge_champion=judge,
        )
    write_json(at.registered, out.to_dict())
    return out.to_dict()


STAGES = {
    "ingest": ingest,
    "train": train,
    "tune": tune,
    "evaluate": evaluate,
    "register": register,
}
