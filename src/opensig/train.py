"""The training loop: AdamW + warm-up/cosine, AMP on GPU, best-by-val-loss and last checkpoints."""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from opensig.config import Config
from opensig.data.dataset import ImageDataset, eval_transform, train_transform
from opensig.data.manifest import known_classes, label_indices, split_rows
from opensig.methods import Method, get_method, sample_weights
from opensig.model import (
    ModelSpec,
    build_spec,
    check_input_size,
    create_model,
    resolve_device,
    save_model_dir,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    spec: ModelSpec
    best_epoch: int
    best_val_loss: float
    seconds: float
    n_train: int
    n_val: int
    device: str
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01):
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast where the GPU has it, else fp16 (with a grad scaler); off on CPU."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def _rows_for(method: Method, df: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = split_rows(df, split)
    return rows if method.uses_unknown else rows[rows["label"] != "unknown"].reset_index(drop=True)


def _loader(
    rows: pd.DataFrame, classes: list[str], transform, spec: ModelSpec, cfg: Config, shuffle: bool
) -> DataLoader:
    dataset = ImageDataset(
        rows["path"].tolist(), label_indices(rows["label"], classes), transform, spec.in_chans
    )
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=shuffle,
        num_workers=cfg.train.num_workers,
        generator=torch.Generator().manual_seed(cfg.train.seed),
        persistent_workers=cfg.train.num_workers > 0,
    )


def _check_readable(batch: dict) -> None:
    bad = [e for e in batch["error"] if e]
    if bad:
        raise RuntimeError(
            f"{len(bad)} training image(s) could not be read ({bad[0]}); rerun ingest"
        )


def train_model(
    cfg: Config, manifest: pd.DataFrame, model_dir: Path, last_dir: Path
) -> TrainResult:
    """Train on the manifest's train split; keep the best (val loss) in ``model_dir``."""
    seed_everything(cfg.train.seed)
    method = get_method(cfg.train.method)
    classes = known_classes(manifest)
    device = resolve_device(cfg.train.device)
    model = create_model(
        cfg.model.backbone,
        method.num_outputs(len(classes)),
        cfg.model.in_chans,
        cfg.model.pretrained,
        cfg.model.pretrained_file,
    )
    spec = build_spec(
        model,
        cfg.model.backbone,
        classes,
        method.name,
        method.num_outputs(len(classes)),
        cfg.model.image_size,
        cfg.model.in_chans,
    )
    model.to(device)
    check_input_size(model, spec.image_size, spec.in_chans)

    train_rows = _rows_for(method, manifest, "train")
    val_rows = _rows_for(method, manifest, "val")
    if train_rows.empty:
        raise ValueError("the train split is empty: add images or lower data.val/test_fraction")
    train_dl = _loader(
        train_rows,
        classes,
        train_transform(spec, cfg.train.augment, cfg.train.seed),
        spec,
        cfg,
        shuffle=True,
    )
    val_dl = _loader(val_rows, classes, eval_transform(spec), spec, cfg, shuffle=False)
    if val_rows.empty:
        log.warning("the val split is empty: the last epoch is kept as the best model")

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    steps = cfg.train.epochs * len(train_dl)
    warmup = round(cfg.train.warmup_epochs * len(train_dl))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    autocast, scaler = _autocast(device, cfg.train.amp)
    loss_kwargs = {
        "smoothing": cfg.train.label_smoothing,
        "unknown_weight": cfg.train.unknown_weight,
    }

    log.info(
        "training %s (%s) on %s: %d train / %d val images, %d classes",
        cfg.model.backbone,
        method.name,
        device,
        len(train_rows),
        len(val_rows),
        len(classes),
    )
    start = time.perf_counter()
    best_loss, best_epoch, history = math.inf, 0, []
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        total, count = 0.0, 0
        bar = tqdm(train_dl, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False, disable=None)
        for batch in bar:
            _check_readable(batch)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with autocast:
                logits = model(images)
            loss = method.loss(logits, labels, **loss_kwargs)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            total += loss.item() * len(labels)
            count += len(labels)
            bar.set_postfix(loss=f"{total / count:.4f}")
        val_loss = _evaluate_loss(model, val_dl, method, device, autocast, loss_kwargs)
        row = {
            "epoch": epoch,
            "train_loss": total / count,
            "val_loss": val_loss,
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        log.info("epoch %d: train_loss %.4f val_loss %.4f", epoch, row["train_loss"], val_loss)
        save_model_dir(last_dir, model, spec)
        if math.isnan(val_loss) or val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            save_model_dir(model_dir, model, spec)
    return TrainResult(
        spec,
        best_epoch,
        best_loss,
        time.perf_counter() - start,
        len(train_rows),
        len(val_rows),
        str(device),
        history,
    )


@torch.no_grad()
def _evaluate_loss(
    model, loader: DataLoader, method: Method, device, autocast, loss_kwargs: dict
) -> float:
    """Mean validation loss (nan for an empty split), weighted as in training."""
    model.eval()
    total, weight = 0.0, 0.0
    for batch in loader:
        _check_readable(batch)
        labels = batch["label"].to(device)
        with autocast:
            logits = model(batch["image"].to(device))
        w = sample_weights(labels, loss_kwargs["unknown_weight"]).sum().item()
        total += method.loss(logits, labels, **loss_kwargs).item() * w
        weight += w
    return total / weight if weight else math.nan
