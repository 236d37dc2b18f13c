"""Warm start after a new class: how many epochs a retrain from the champion needs to reach
the val macro-F1 of a training from scratch, and the time that saves.

Fashion-MNIST, the open-set benchmark's protocol and split (`openset.prepare_manifest`): a
champion is trained on the known classes but one (`added`), then the added class arrives.
From scratch: `epochs` epochs on every class. Warm (`train.init_from`: the champion): 1, 2,
... epochs (each a full schedule of that length) until its val macro-F1 reaches scratch's.
Every run is tuned on val and scored on val with the pipeline's own code.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from opensig.bench.common import environment
from opensig.bench.openset import PROTOCOL, prepare_manifest, run_config
from opensig.bench.options import WarmStartOptions
from opensig.config import Config, parse_config
from opensig.data.manifest import read_manifest, split_rows, write_manifest
from opensig.evaluation import evaluate_bundle
from opensig.io import atomic_write, read_json, write_json
from opensig.predict import Bundle
from opensig.stages import Layout, train, tune

log = logging.getLogger(__name__)


def val_macro_f1(cfg: Config, at: Layout) -> float:
    """Train's model, tuned on val, scored on val (macro-F1 over the classes + unknown)."""
    tune(cfg, at)
    bundle = Bundle.load(at.model_dir, at.thresholds, cfg.train.device)
    rows = split_rows(read_manifest(at.manifest, cfg.data.root), "val")
    return evaluate_bundle(bundle, rows, cfg.evaluate.batch_size, False).metrics["macro_f1"]


def run_training(cfg: Config, manifest: Path, run_dir: Path) -> dict:
    at = Layout.under(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    at.manifest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(manifest, at.manifest)
    train(cfg, at)
    seconds = read_json(at.train_report)["seconds"]
    return {"epochs": cfg.train.epochs, "seconds": seconds, "val_macro_f1": val_macro_f1(cfg, at)}


def run_warm_start(base: Config, opts: WarmStartOptions) -> dict:
    """The champion, the scratch run and the warm runs; writes ``warm_start.{json,md}``."""
    rows = prepare_manifest(opts, PROTOCOL[opts.dataset], opts.work)
    if opts.added not in set(rows["label"]):
        raise ValueError(f"--added {opts.added!r} is not a known class of {opts.dataset}")
    before, after = opts.work / "before.parquet", opts.work / "after.parquet"
    write_manifest(rows[rows["label"] != opts.added], before)
    write_manifest(rows, after)
    cfg = run_config(base, opts, "sigmoid_bce", opts.seed, opts.work)
    log.info("champion: %d epochs without %s", opts.epochs, opts.added)
    champion = run_training(cfg, before, opts.work / "champion")
    scratch = run_training(cfg, after, opts.work / "scratch")
    warm = []
    for epochs in range(1, opts.epochs + 1):
        raw = cfg.model_dump(mode="json")
        raw["train"].update(
            epochs=epochs, init_from=str(Layout.under(opts.work / "champion").model_dir)
        )
        warm.append(run_training(parse_config(raw), after, opts.work / f"warm-{epochs}"))
        if warm[-1]["val_macro_f1"] >= scratch["val_macro_f1"]:
            break
    reached = warm[-1]["val_macro_f1"] >= scratch["val_macro_f1"]
    result = {
        "champion": champion,
        "scratch": scratch,
        "warm": warm,
        "epochs_to_reach": warm[-1]["epochs"] if reached else None,
        "seconds_saved": scratch["seconds"] - warm[-1]["seconds"] if reached else None,
        "meta": {
            "dataset": opts.dataset,
            "added": opts.added,
            "backbone": opts.backbone,
            "image_size": opts.image_size,
            "per_class": opts.per_class,
            "batch_size": opts.batch_size,
            "seed": opts.seed,
            **environment(),
        },
    }
    write_json(opts.out / "warm_start.json", result)
    atomic_write(opts.out / "warm_start.md", lambda tmp: tmp.write_text(to_markdown(result)))
    return result


def to_markdown(result: dict) -> str:
    lines = ["| run | epochs | val macro-F1 | train s |", "| --- | --- | --- | --- |"]
    named = [("champion (no " + result["meta"]["added"] + ")", result["champion"])]
    named += [("from scratch", result["scratch"])]
    named += [("warm start", run) for run in result["warm"]]
    for name, run in named:
        lines.append(
            f"| {name} | {run['epochs']} | {run['val_macro_f1']:.4f} | {run['seconds']:.0f} |"
        )
    reached = result["epochs_to_reach"]
    lines += [
        "",
        f"Warm start reaches the from-scratch val macro-F1 in {reached} epoch(s), "
        f"{result['seconds_saved']:.0f} s of training saved."
        if reached
        else "Warm start did not reach the from-scratch val macro-F1 within as many epochs.",
    ]
    return "\n".join(lines)
