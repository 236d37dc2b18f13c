"""Speed benchmark: is the time going into the model, or into opensig's plumbing?

Every figure is measured in the same process, on the same data, model, batch size and
device, and reported as a ratio to its limit:

- train: images/s of the real train stage (decode cache, augmentation, loss, optimizer,
  per-epoch validation excluded) against the same training step on random tensors already
  in memory (the loop's own limit), and against a plain reference loop (torchvision
  ``ImageFolder`` + ``DataLoader``, no tricks) on the same PNG folder;
- predict: images/s of ``Bundle.predict`` on a folder of PNGs against the same model's
  batched forward pass on random tensors;
- ingest: files/s of the scan (open, fully decode, hash) over a PNG tree, first run and
  re-run on unchanged files.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from opensig.bench import budget_params, environment
from opensig.config import Config, parse_config
from opensig.data import demo
from opensig.data.manifest import write_manifest
from opensig.data.scan import scan_folder
from opensig.data.split import assign_splits
from opensig.io import atomic_write, read_json, write_json
from opensig.methods import get_method
from opensig.model import build_spec, create_model, model_digest, resolve_device
from opensig.predict import Bundle, collect_images, write_thresholds
from opensig.stages import Layout, train
from opensig.step import StepOptions, TrainingStep

log = logging.getLogger(__name__)


@dataclass
class SpeedOptions:
    backbone: str = "resnet18"
    image_size: int = 64
    in_chans: int = 1
    batch_size: int = 128
    device: str = "auto"
    epochs: int = 2  # the last epoch is measured; the first pays for warm-up and decoding
    per_class: int = 500  # Fashion-MNIST images per known class (6 classes)
    rounds: int = 3  # stage, limit and reference interleaved; medians are reported
    ingest_images: int | None = None  # per class, train then test files; None: all 70k
    work: Path = Path("bench/work/speed")
    out: Path = Path("bench/results")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(step, batches: int, warmup: int, device: torch.device) -> float:
    """Seconds per step over ``batches`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    _sync(device)
    return (time.perf_counter() - start) / batches


def _limit_step(cfg: Config, n_classes: int, channels_last: bool) -> Callable[[], None]:
    """The stage's training step (TrainingStep + AdamW) on one random batch in memory, made
    by the step's own ``prepare`` once: each call is a forward, loss, backward and update."""
    device = resolve_device(cfg.train.device)
    method = get_method(cfg.train.method)
    model, outputs = cfg.model, method.num_outputs(n_classes)
    net = create_model(model.backbone, outputs, model.in_chans)
    classes = [str(k) for k in range(n_classes)]
    spec = build_spec(
        net, model.backbone, classes, method.name, outputs, model.image_size, model.in_chans
    )
    options = replace(StepOptions.of(cfg.train), channels_last=channels_last)
    step = TrainingStep(net, method, spec, device, options).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    batch, size = cfg.train.batch_size, model.image_size
    pixels = torch.randint(0, 256, (batch, size, size, model.in_chans), dtype=torch.uint8)
    labels = torch.randint(0, n_classes, (batch,))
    images, labels = step.prepare({"image": pixels, "label": labels, "error": [""] * batch})

    def one_step() -> None:
        step.update(step(images, labels)["loss"], optimizer)

    return one_step


def train_step_limit(cfg: Config, n_classes: int, steps: int) -> float:
    """Images/s of one training step on random tensors in memory: the loop's own ceiling."""
    one_step = _limit_step(cfg, n_classes, cfg.train.channels_last)
    return cfg.train.batch_size / _timed_steps(one_step, steps, 3, resolve_device(cfg.train.device))


def reference_train(folder: Path, cfg: Config, n_classes: int, epochs: int) -> float:
    """A plain torchvision loop on the same PNGs: ImageFolder, DataLoader, one-hot BCE.

    The last epoch, like the stage's figure.
    """
    import torch.nn.functional as F
    from torchvision import datasets
    from torchvision import transforms as T

    device = resolve_device(cfg.train.device)
    size = cfg.model.image_size
    half = [0.5] * cfg.model.in_chans
    transform = T.Compose(
        [
            *([T.Grayscale(1)] if cfg.model.in_chans == 1 else []),  # ImageFolder opens as RGB
            T.RandomResizedCrop(size, scale=(0.8, 1.0)),
            T.ToTensor(),
            T.Normalize(half, half),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform=transform),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=0 if device.type == "cpu" else 8,
        pin_memory=device.type == "cuda",
    )
    model = create_model(cfg.model.backbone, n_classes, cfg.model.in_chans).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        count = 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.binary_cross_entropy_with_logits(
                model(images), F.one_hot(labels, n_classes).float()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            count += len(labels)
        _sync(device)
        rates.append(count / (time.perf_counter() - start))
    return rates[-1]


def forward_limit(
    model: torch.nn.Module, spec_size: int, in_chans: int, batch: int, n_images: int
) -> float:
    """Images/s of the model's batched forward pass (eval, no grad) on random tensors,
    over as many images as the folder predict scored, in the channels-last layout
    ``model_input`` feeds it (the faster one: the limit is the model at its best)."""
    device = next(model.parameters()).device
    images = torch.randn(batch, in_chans, spec_size, spec_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(images)

    return batch / _timed_steps(step, math.ceil(n_images / batch), 2, device)


def _config(base: Config, opts: SpeedOptions, data: Path) -> Config:
    raw = budget_params(base, opts)
    raw["data"].update(root=str(data), holdout_unknown=[])
    raw["mlflow"]["experiment"] = "opensig-bench-speed"  # not among the user's model runs
    return parse_config(raw)


def run_speed(base: Config, opts: SpeedOptions) -> dict:
    """Every measurement; writes ``speed_<device>_<size>px.{json,md}`` under ``opts.out``."""
    data = opts.work / "data"
    if not (data / "known").is_dir():
        demo.write_fashion_mnist(
            data, per_class=opts.per_class, parts=("train",), classes=demo.FASHION_KNOWN
        )
    cfg = _config(base, opts, data)
    device = resolve_device(cfg.train.device)
    at = Layout.under(opts.work / "run")
    shutil.rmtree(opts.work / "cache", ignore_errors=True)  # the first epoch pays the decoding

    scan = scan_folder(data)
    manifest = assign_splits(scan.records, 0.15, 0.15, [], 0)
    write_manifest(manifest, at.manifest)
    n_classes, n_train = len(scan.classes), int((manifest["split"] == "train").sum())
    epoch_steps = math.ceil(n_train / cfg.train.batch_size)
    rounds = []
    for round_ in range(opts.rounds):
        # Interleaved, so that a slow spell of a shared machine hits all three alike.
        log.info("speed round %d: train stage on %d images", round_ + 1, n_train)
        start = time.perf_counter()
        train(cfg, at)
        seconds = time.perf_counter() - start
        epochs = pd.read_csv(at.train_plots / "train_history.csv")["images_per_s"].tolist()
        stage = epochs[-1]  # the first epoch pays for the decoding and warm-up
        limit = train_step_limit(cfg, n_classes, epoch_steps)
        reference = reference_train(data / "known", cfg, n_classes, opts.epochs)
        rounds.append(
            {
                "stage_images_per_s": stage,
                "limit_images_per_s": limit,
                "reference_images_per_s": reference,
                "ratio_to_limit": stage / limit,
                "reference_ratio_to_limit": reference / limit,
                "stage_seconds": seconds,
                "decode_seconds": read_json(at.train_report)["decode_seconds"],
            }
        )
    results: dict = {"train": {**_medians(rounds), "rounds": rounds, "epochs": opts.epochs}}

    # Predict: the trained model on every PNG of the folder, interleaved with its forward.
    write_thresholds(
        at.thresholds,
        scan.classes,
        [0.5] * n_classes,
        "fixed",
        {"value": 0.5},
        model_sha256=model_digest(at.model_dir),
    )
    bundle = Bundle.load(at.model_dir, at.thresholds, opts.device)
    files, _ = collect_images([data])
    rounds = []
    for _ in range(opts.rounds):
        start = time.perf_counter()
        bundle.predict(files, batch_size=256, progress=False)
        rate = len(files) / (time.perf_counter() - start)
        forward = forward_limit(bundle.model, opts.image_size, opts.in_chans, 256, len(files))
        rounds.append(
            {
                "predict_images_per_s": rate,
                "forward_images_per_s": forward,
                "ratio_to_limit": rate / forward,
            }
        )
    results["predict"] = {**_medians(rounds), "rounds": rounds, "images": len(files)}
    results["ingest"] = ingest_speed(opts)
    options = {k: str(v) for k, v in asdict(opts).items()}
    results["meta"] = {**environment(device), "options": options}
    stem = opts.out / f"speed_{device.type}_{opts.image_size}px"
    write_json(stem.with_suffix(".json"), results)
    table = to_markdown(results)
    atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    return results


def _medians(rounds: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in rounds])) for key in rounds[0]}


def ingest_speed(opts: SpeedOptions) -> dict:
    """Files/s of the scan over every Fashion-MNIST image as a PNG: first run, then re-run."""
    tree = opts.work / "ingest"
    if not (tree / "known").is_dir():
        demo.write_fashion_mnist(tree, per_class=opts.ingest_images, parts=("train", "test"))
    cache = opts.work / "scan.parquet"
    cache.unlink(missing_ok=True)
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        result = scan_folder(tree, cache=cache)
        timings.append((time.perf_counter() - start, result))
    (first, scan), (again, rescan) = timings
    files = len(scan.records) + len(scan.skipped) + len(scan.duplicates)
    files += sum(len(c["paths"]) for c in scan.conflicts)
    return {
        "files": files,
        "first_files_per_s": files / first,
        "rerun_files_per_s": files / again,
        "rerun_reused": rescan.reused,
    }


def to_markdown(results: dict) -> str:
    t, p, i = results["train"], results["predict"], results["ingest"]
    rows = [
        "| measure | images/s | limit | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| train stage | {t['stage_images_per_s']:.0f} | {t['limit_images_per_s']:.0f} | "
        f"{t['ratio_to_limit']:.2f} |",
        f"| reference loop (ImageFolder + DataLoader) | {t['reference_images_per_s']:.0f} | "
        f"{t['limit_images_per_s']:.0f} | {t['reference_ratio_to_limit']:.2f} |",
        f"| predict (folder of PNGs) | {p['predict_images_per_s']:.0f} | "
        f"{p['forward_images_per_s']:.0f} | {p['ratio_to_limit']:.2f} |",
        f"| ingest, first scan ({i['files']} files) | {i['first_files_per_s']:.0f} | | |",
        f"| ingest, re-run (unchanged) | {i['rerun_files_per_s']:.0f} | | |",
    ]
    return "\n".join(rows) + "\n"
