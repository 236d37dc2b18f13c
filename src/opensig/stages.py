"""One thin function per DVC stage: read config and inputs, call the library, write outputs.

Each reads like its entry in dvc.yaml; the paths below are the ones dvc.yaml declares.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from opensig.config import Config
from opensig.data.manifest import label_indices, read_manifest, split_rows, write_manifest
from opensig.data.scan import scan_folder
from opensig.data.split import assign_splits, check_trainable, split_summary
from opensig.evaluation import evaluate_bundle, score_rows
from opensig.io import read_json, write_json
from opensig.model import load_model_dir, resolve_device
from opensig.plots import write_confusion, write_history, write_roc
from opensig.predict import Bundle, resolve_model_dir, write_thresholds
from opensig.thresholds import tune_thresholds

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
    scan = scan_folder(
        cfg.data.root,
        cache=cfg.data.cache_dir / "scan.parquet",
        max_pixels=cfg.data.max_image_pixels,
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


def train(cfg: Config, at: Layout = HERE) -> dict:
    """Also the entry point of `torchrun -m opensig train`: every process trains, rank 0 writes."""
    from opensig.train import is_main_process, train_model  # torch-heavy: import when used

    result = train_model(cfg, read_manifest(at.manifest, cfg.data.root), at.model_dir, at.last_dir)
    if not is_main_process():
        return {}
    write_history(result.history, at.train_plots)
    report = {k: v for k, v in asdict(result).items() if k not in ("spec", "history")}
    report["classes"] = result.spec.classes
    write_json(at.train_report, report)
    return report


def tune(cfg: Config, at: Layout = HERE) -> dict:
    """Per-class thresholds from the validation split (never from test)."""
    model, spec = load_model_dir(at.model_dir, resolve_device(cfg.train.device))
    rows = split_rows(read_manifest(at.manifest, cfg.data.root), "val")
    if rows.empty:
        raise ValueError(
            "the val split is empty: thresholds need validation images (raise data.val_fraction)"
        )
    scores = score_rows(model, spec, rows, cfg.evaluate.batch_size)
    options = {
        "target_precision": cfg.tune.target_precision,
        "value": cfg.tune.fixed_threshold,
        "doc_k": cfg.tune.doc_k,
    }
    values = tune_thresholds(
        scores, label_indices(rows["label"].tolist(), spec.classes), cfg.tune.strategy, **options
    )
    write_thresholds(at.thresholds, spec.classes, values, cfg.tune.strategy, options)
    return {
        "strategy": cfg.tune.strategy,
        "thresholds": dict(zip(spec.classes, values.tolist(), strict=True)),
    }


def evaluate(cfg: Config, at: Layout = HERE) -> dict:
    """Open-set metrics and plots on the test split (known, unknown and novel unknown images)."""
    bundle = Bundle.load(at.model_dir, at.thresholds, cfg.train.device)
    test_rows = split_rows(read_manifest(at.manifest, cfg.data.root), "test")
    result = evaluate_bundle(bundle, test_rows, cfg.evaluate.batch_size)
    write_confusion(result.labels, result.preds, bundle.spec.classes, at.plots)
    write_roc(result.scores, result.labels, result.novel, at.plots)
    write_json(at.metrics, result.metrics)
    log.info("evaluate: %s", {k: v for k, v in result.metrics.items() if k != "novel"})
    return result.metrics


def register(cfg: Config, at: Layout = HERE) -> dict:
    """Log the run to MLflow, register the model, move the aliases, write registered.json."""
    from opensig import registry  # mlflow is a heavy import

    metrics = read_json(at.metrics)
    pngs = sorted(at.plots.glob("*.png")) + sorted(at.train_plots.glob("*.png"))
    test_rows = split_rows(read_manifest(at.manifest, cfg.data.root), "test")
    # Bounded retries, a reachability check before anything is logged, redacted errors.
    with registry.connected(cfg.mlflow) as tracking_uri:
        run_id, version = registry.log_and_register(
            cfg,
            metrics,
            at.model_dir,
            at.thresholds,
            [*pngs, at.metrics, at.ingest_report, at.train_report, at.thresholds],
        )

        def champion_value(champion: str) -> float | None:
            uri = f"models:/{cfg.mlflow.registered_model}/{champion}"
            champion_bundle = Bundle.load(
                resolve_model_dir(uri, tracking_uri), device=cfg.train.device
            )
            result = evaluate_bundle(champion_bundle, test_rows, cfg.evaluate.batch_size)
            return registry.metric_value(result.metrics, cfg.promote.metric)

        promoted, comparison = registry.promote(
            cfg, version, registry.metric_value(metrics, cfg.promote.metric), champion_value
        )
        aliases = registry.aliases_of(cfg, version)
    out = registry.Registration(
        cfg.mlflow.registered_model, version, run_id, aliases, promoted, comparison
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
