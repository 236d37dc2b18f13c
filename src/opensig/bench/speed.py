"""Speed benchmark: is the time going into the model, or into opensig's plumbing?

Every figure is measured in the same process, on the same data, model, batch size and
device, and reported as a ratio to its limit:

- train: images/s of the real train stage (decode cache, augmentation, loss, optimizer,
  per-epoch validation excluded) against the same training step (``TrainingStep``: same
  method, loss options, autocast and optimizer) on one random batch already in memory (the
  loop's own limit, in the faster memory layout of the two, so that a ratio cannot flatter
  the stage), and against a plain reference loop (torchvision ``ImageFolder`` +
  ``DataLoader``, no tricks, in the layout it gets by default) on the same PNG folder;
- predict: images/s of ``Bundle.predict`` on a folder of PNGs against the same model's
  batched forward pass on random tensors;
- the decode cache's cap: the train stage's images/s with 0%, 50% and 100% of its images
  in the decode cache (the rest decoded from their files every epoch);
- ingest: files/s of the scan (open, fully decode, hash) over a PNG tree, first run and
  re-run on unchanged files.

Every option is checked before anything runs (``check``). The tables give the median of
the interleaved rounds with their spread (min-max), then every round.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from opensig.backbones import backbone_problem
from opensig.batch import collect_images
from opensig.bench.common import budget_params, environment, markdown_table, summary
from opensig.bench.options import SpeedOptions
from opensig.config import Config, parse_config
from opensig.data import demo
from opensig.data.cache import usage
from opensig.data.manifest import write_manifest
from opensig.data.scan import scan_cache, scan_folder
from opensig.data.split import assign_splits
from opensig.decision import write_thresholds
from opensig.io import atomic_write, read_json, write_json
from opensig.methods import get_method
from opensig.model import (
    build_spec,
    create_model,
    model_digest,
    resolve_device,
)
from opensig.predict import Bundle
from opensig.stages import Layout, train
from opensig.step import StepOptions, TrainingStep

log = logging.getLogger(__name__)


def check(opts: SpeedOptions) -> None:
    """Refuse a bad option before anything runs (not after the train and predict rounds)."""
    problem = backbone_problem(opts.backbone)
    if problem:
        raise ValueError(f"--backbone: {problem}")
    if opts.image_size < 8:
        raise ValueError(f"--image-size must be at least 8 (px), got {opts.image_size}")
    if opts.in_chans not in (1, 3):
        raise ValueError(f"--in-chans must be 1 or 3, got {opts.in_chans}")
    if opts.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {opts.device!r}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    counts = {
        "--batch-size": opts.batch_size,
        "--epochs": opts.epochs,
        "--per-class": opts.per_class,
        "--rounds": opts.rounds,
    }
    if opts.ingest_images is not None:
        counts["--ingest-images"] = opts.ingest_images
    for option, value in counts.items():
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if not (opts.work / "data" / "known").is_dir() and not demo.FASHION_DIR.is_dir():
        raise ValueError(
            f"Fashion-MNIST is not in {demo.FASHION_DIR}: apt-get install dataset-fashion-mnist"
        )


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


LAYOUTS = {"channels_last": True, "contiguous": False}


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


def train_step_limit(
    cfg: Config, n_classes: int, steps: int, trial_steps: int = 3
) -> tuple[float, str]:
    """Images/s of one training step on random tensors in memory, the loop's own ceiling, and
    the layout it was measured in: both layouts (channels-last, contiguous) are tried for
    ``trial_steps`` steps and the faster runs ``steps``, so that the limit is the step at its
    best whichever layout the stage uses."""
    device = resolve_device(cfg.train.device)
    candidates = {name: _limit_step(cfg, n_classes, cl) for name, cl in LAYOUTS.items()}
    trials = {
        name: _timed_steps(one_step, trial_steps, 2, device)
        for name, one_step in candidates.items()
    }
    layout = min(trials, key=trials.__getitem__)
    log.info(
        "limit layout: %s (%s)",
        layout,
        ", ".join(f"{name} {seconds * 1000:.0f} ms/step" for name, seconds in trials.items()),
    )
    return cfg.train.batch_size / _timed_steps(candidates[layout], steps, 1, device), layout


def layout_of(images: torch.Tensor) -> str:
    """The memory layout of a batch (one that is both, e.g. one channel, is contiguous)."""
    if images.is_contiguous():
        return "contiguous"
    return "channels_last" if images.is_contiguous(memory_format=torch.channels_last) else "other"


def reference_train(folder: Path, cfg: Config, n_classes: int, epochs: int) -> tuple[float, str]:
    """A plain torchvision loop on the same PNGs: ImageFolder, DataLoader, one-hot BCE, in
    the memory layout it gets by default. Images/s of the last epoch, like the stage's
    figure, and that layout (of its batches)."""
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
    rates, layout = [], "none"
    for _ in range(epochs):
        start = time.perf_counter()
        count = 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            layout = layout_of(images)
            loss = F.binary_cross_entropy_with_logits(
                model(images), F.one_hot(labels, n_classes).float()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            count += len(labels)
        _sync(device)
        rates.append(count / (time.perf_counter() - start))
    return rates[-1], layout


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


def _config(
    base: Config,
    opts: SpeedOptions,
    data: Path,
    cache_dir: Path | None = None,
    cache_max_gb: float | None = None,
) -> Config:
    raw = budget_params(base, opts)
    raw["data"].update(root=str(data), holdout_unknown=[])
    if cache_dir is not None:
        raw["data"]["cache_dir"] = str(cache_dir)
    raw["train"]["decode_cache_max_gb"] = cache_max_gb
    raw["mlflow"]["experiment"] = "opensig-bench-speed"  # not among the user's model runs
    return parse_config(raw)


def run_speed(base: Config, opts: SpeedOptions) -> dict:
    """Every measurement; writes ``speed_<device>_<size>px.{json,md}`` under ``opts.out``."""
    check(opts)
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
        limit, limit_layout = train_step_limit(cfg, n_classes, epoch_steps)
        reference, reference_layout = reference_train(data / "known", cfg, n_classes, opts.epochs)
        rounds.append(
            {
                "stage_images_per_s": stage,
                "limit_images_per_s": limit,
                "reference_images_per_s": reference,
                "ratio_to_limit": stage / limit,
                "reference_ratio_to_limit": reference / limit,
                "stage_seconds": seconds,
                "decode_seconds": read_json(at.train_report)["decode_seconds"],
                "stage_layout": StepOptions.of(cfg.train).layout,
                "limit_layout": limit_layout,
                "reference_layout": reference_layout,
            }
        )
    results: dict = {"train": {**summary(rounds), "rounds": rounds, "epochs": opts.epochs}}
    results["cached"] = cache_speed(base, opts, data, manifest)

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
    bundle.predict(files[:256], batch_size=256, progress=False)  # warm, as the forward limit is
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
    results["predict"] = {**summary(rounds), "rounds": rounds, "images": len(files)}
    results["ingest"] = ingest_speed(opts)
    options = {k: str(v) for k, v in asdict(opts).items()}
    results["meta"] = {**environment(device), "options": options}
    stem = opts.out / f"speed_{device.type}_{opts.image_size}px"
    write_json(stem.with_suffix(".json"), results)
    table = to_markdown(results)
    atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    return results


CACHED_SHARES = (0.0, 0.5, 1.0)  # of the train images held by the decode cache


def cache_speed(base: Config, opts: SpeedOptions, data: Path, manifest: pd.DataFrame) -> dict:
    """The train stage's images/s (last epoch) with none, half and all of the train images
    in the decode cache (``train.decode_cache_max_gb`` sized to that share; the rest are
    decoded from their files every epoch): the cost of a cap below the data. Each run
    starts from an empty cache of its own; the shares are interleaved round by round."""
    image_bytes = opts.image_size * opts.image_size * opts.in_chans
    n_train = int((manifest["split"] == "train").sum())
    rounds = []
    for round_ in range(opts.rounds):
        row: dict = {}
        for share in CACHED_SHARES:
            cache_dir = opts.work / f"cache-{share * 100:.0f}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            # the train rows fill the cache first; a shard's header is 128 bytes
            cap = None if share == 1.0 else (share * n_train * image_bytes + 128) / 1e9
            cfg = _config(base, opts, data, cache_dir, cap)
            at = Layout.under(opts.work / f"run-cache-{share * 100:.0f}")
            write_manifest(manifest, at.manifest)
            log.info("cache round %d: train stage, %.0f%% cached", round_ + 1, share * 100)
            train(cfg, at)
            history = pd.read_csv(at.train_plots / "train_history.csv")
            held = sum(folder.entries for folder in usage(cache_dir))
            row[f"cached_{share * 100:.0f}"] = min(held, n_train) / n_train
            row[f"images_per_s_{share * 100:.0f}"] = history["images_per_s"].iloc[-1]
        rounds.append(row)
    return {**summary(rounds), "rounds": rounds}


def ingest_speed(opts: SpeedOptions) -> dict:
    """Files/s of the scan over every Fashion-MNIST image as a PNG: first run, then re-run."""
    tree = opts.work / "ingest"
    if not (tree / "known").is_dir():
        demo.write_fashion_mnist(tree, per_class=opts.ingest_images, parts=("train", "test"))
    cache = scan_cache(opts.work)
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


def _spread_row(name: str, figures: dict, rate: str, limit: str, ratio: str) -> list[str]:
    """A summary row: images/s, its limit and their ratio, each as median and min-max."""
    cells = [name]
    for key, digits in ((rate, 0), (limit, 0), (ratio, 2)):
        low, high = figures["spread"][key]
        cells += [f"{figures[key]:.{digits}f}", f"{low:.{digits}f}-{high:.{digits}f}"]
    return cells


TRAIN_ROUND = {  # column: (figure, format)
    "train stage": ("stage_images_per_s", "{:.0f}"),
    "stage layout": ("stage_layout", "{}"),
    "limit": ("limit_images_per_s", "{:.0f}"),
    "limit layout": ("limit_layout", "{}"),
    "stage / limit": ("ratio_to_limit", "{:.2f}"),
    "reference": ("reference_images_per_s", "{:.0f}"),
    "reference layout": ("reference_layout", "{}"),
    "reference / limit": ("reference_ratio_to_limit", "{:.2f}"),
}
PREDICT_ROUND = {
    "predict": ("predict_images_per_s", "{:.0f}"),
    "forward": ("forward_images_per_s", "{:.0f}"),
    "ratio": ("ratio_to_limit", "{:.2f}"),
}


def _roundsmarkdown_table(rounds: list[dict], columns: dict[str, tuple[str, str]]) -> list[str]:
    rows = [
        [str(n), *(form.format(r[key]) for key, form in columns.values())]
        for n, r in enumerate(rounds, 1)
    ]
    return markdown_table(["round", *columns], rows)


def _cached_rows(cached: dict) -> list[list[str]]:
    """The train stage with a share of its images cached: images/s, against all cached."""
    rows = []
    for share in CACHED_SHARES:
        pct = f"{share * 100:.0f}"
        low, high = cached["spread"][f"images_per_s_{pct}"]
        rate, full = cached[f"images_per_s_{pct}"], cached["images_per_s_100"]
        rows.append(
            [
                f"train stage, {cached[f'cached_{pct}']:.0%} of its images in the decode cache",
                f"{rate:.0f}",
                f"{low:.0f}-{high:.0f}",
                f"{full:.0f} (all cached)",
                "",
                f"{rate / full:.2f}",
                "",
            ]
        )
    return rows


def to_markdown(results: dict) -> str:
    """Medians with their spread (min-max) over the rounds, then every round."""
    t, p, i = results["train"], results["predict"], results["ingest"]
    reference = f"reference loop (ImageFolder + DataLoader, {t['rounds'][0]['reference_layout']})"
    rows = [
        _spread_row("train stage", t, "stage_images_per_s", "limit_images_per_s", "ratio_to_limit"),
        _spread_row(
            reference, t, "reference_images_per_s", "limit_images_per_s", "reference_ratio_to_limit"
        ),
        _spread_row(
            "predict (folder of PNGs)",
            p,
            "predict_images_per_s",
            "forward_images_per_s",
            "ratio_to_limit",
        ),
        *_cached_rows(results["cached"]),
        [f"ingest, first scan ({i['files']} files)", f"{i['first_files_per_s']:.0f}", *[""] * 5],
        ["ingest, re-run (unchanged)", f"{i['rerun_files_per_s']:.0f}", *[""] * 5],
    ]
    header = ["measure", "images/s", "min-max", "limit", "min-max", "ratio", "min-max"]
    lines = [
        f"Medians of {len(t['rounds'])} interleaved rounds with their spread (min-max); the "
        "train limit is the in-memory training step in the faster memory layout.",
        "",
        *markdown_table(header, rows),
        "",
        "Train, every round:",
        "",
        *_roundsmarkdown_table(t["rounds"], TRAIN_ROUND),
        "",
        "Predict, every round:",
        "",
        *_roundsmarkdown_table(p["rounds"], PREDICT_ROUND),
    ]
    return "\n".join(lines) + "\n"
