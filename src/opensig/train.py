"""The training loop: AdamW + warm-up/cosine, AMP on GPU, best-by-val-loss and last checkpoints.

The time should go into the model's forward and backward passes: images are decoded once
(``opensig.data.cache``), the loop never waits on the host per step (no ``.item()``), and on
GPU it runs in bf16/fp16 with channels-last tensors fed from pinned memory by worker
processes. Under ``torchrun`` it trains with DistributedDataParallel: every process takes a
shard of each epoch, and only rank 0 writes checkpoints and reports.

A stopped run (Ctrl-C, SIGTERM, SIGKILL, a lost machine) resumes when rerun, from the state
rank 0 saves after every epoch (``opensig.resume``). No RNG state is saved because none is
carried from one epoch to the next: every epoch reseeds python, numpy and torch, the shuffle
order and the augmentation (in the main process and in each loader worker) from (train.seed,
epoch, rank). Epoch k thus draws the same numbers after a restart as after epoch k-1, and on
CPU a resumed run ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, get_worker_info
from tqdm.auto import tqdm

from opensig.config import Config
from opensig.data.cache import cached_images
from opensig.data.dataset import (
    ImageDataset,
    eval_transform,
    loader_workers,
    model_input,
    train_transform,
)
from opensig.data.manifest import is_multi_label, known_classes, label_targets, split_rows
from opensig.data.split import small_train_warning
from opensig.io import signals_deferred
from opensig.methods import Method, get_method, mix_unknowns, sample_weights
from opensig.model import (
    ModelSpec,
    build_spec,
    check_input_size,
    create_model,
    resolve_device,
    save_model_dir,
    warm_start,
)
from opensig.progress import image_bar
from opensig.resume import load_state, resume_dir, save_state, state_folder, weights_file

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
    world_size: int = 1
    decode_seconds: float = 0.0
    images_per_s: float = 0.0  # training steps only, after the first epoch's warm-up
    history: list[dict] = field(default_factory=list)


class EpochLog(Protocol):
    """Where rank 0 reports each epoch's ``history`` row besides the log (the train stage: an
    MLflow run). ``start`` gets the id a stopped training saved with its state (None if none)
    and the rows of the epochs done; the id it returns is saved with the state, so that a
    resumed training goes on reporting to the same place."""

    def start(self, saved_id: str | None, history: list[dict]) -> str | None: ...

    def log_epoch(self, row: dict) -> None: ...


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )


def is_main_process() -> bool:
    """Stages call this to let only rank 0 write outputs."""
    return Distributed.from_env().main


def _start_distributed(dist: Distributed, device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPU, gloo on CPU); one GPU per local rank."""
    if dist.world == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int, worker: int = 0) -> int:
    """A 32-bit seed that depends on its arguments only (worker 0: the training process)."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, rank, worker]).generate_state(1)[0])


def _seed_epoch(seed: int, epoch: int, rank: int, worker: int = 0) -> int:
    """Reseed python, numpy and torch (all devices) for this epoch; return the seed used."""
    value = epoch_seed(seed, epoch, rank, worker)
    seed_everything(value)
    return value


class _EpochSeeded(Dataset):
    """The train set: when the epoch changes, the process fetching images (the main one, or
    a loader worker) reseeds its RNGs and the augmentation's from (seed, epoch, rank, worker).

    Persistent loader workers keep their copy of the dataset across epochs, so the epoch
    reaches them through shared memory.
    """

    def __init__(self, dataset: ImageDataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._seeded_epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        epoch = int(self.epoch)
        if epoch != self._seeded_epoch:
            info = get_worker_info()
            worker = 0 if info is None else info.id + 1
            self.dataset.transform.set_random_seed(_seed_epoch(self.seed, epoch, self.rank, worker))
            self._seeded_epoch = epoch
        return self.dataset[index]


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


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Backward and step, through the fp16 grad scaler when there is one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def _rows_for(method: Method, df: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = split_rows(df, split)
    return rows if method.uses_unknown else rows[rows["label"] != "unknown"].reset_index(drop=True)


def _dataset(
    rows: pd.DataFrame,
    classes: list[str],
    multi_label: bool,
    transform,
    spec: ModelSpec,
    cfg: Config,
    dist: Distributed,
) -> ImageDataset:
    """Rows -> dataset, reading the decode-once cache (rank 0 fills it, the others wait).

    Images are decoded as ingest checked them: up to ``data.max_image_pixels``.
    """
    decoded = None
    limit = cfg.data.max_image_pixels
    if cfg.train.decode_cache and not rows.empty:
        args = (rows["path"].tolist(), rows["hash"].tolist(), spec.image_size, spec.in_chans)
        if dist.main:
            decoded = cached_images(*args, cfg.data.cache_dir, limit)
        if dist.world > 1:
            torch_dist.barrier()
            decoded = cached_images(*args, cfg.data.cache_dir, limit) if not dist.main else decoded
    labels = label_targets(rows["label"], classes, multi_label)
    return ImageDataset(
        rows["path"].tolist(),
        labels,
        transform,
        spec.in_chans,
        decoded,
        min_size=spec.image_size,
        max_pixels=limit,
    )


def _loader(
    dataset: Dataset,
    cfg: Config,
    shuffle: bool,
    device: torch.device,
    dist: Distributed,
) -> DataLoader:
    """The shuffling sampler gets a generator of its own, reseeded every epoch: the loader's
    generator also seeds the workers, but only when they start (once, with persistent ones)."""
    workers = loader_workers(cfg.train.num_workers, device, dist.world)
    sampler: DistributedSampler | RandomSampler | None = None
    if dist.world > 1:
        sampler = DistributedSampler(
            dataset, dist.world, dist.rank, shuffle=shuffle, seed=cfg.train.seed
        )
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    per_process = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.train.seed),
        # a last training batch of one image would stop BatchNorm ("more than 1 value per
        # channel"): drop it (another image each epoch, the order being shuffled)
        drop_last=shuffle and per_process > 1 and per_process % cfg.train.batch_size == 1,
    )


def _start_epoch(loader: DataLoader, train_set: _EpochSeeded, epoch: int) -> None:
    """Make everything random in this epoch a function of (seed, epoch, rank) alone."""
    value = _seed_epoch(train_set.seed, epoch, train_set.rank)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif isinstance(loader.sampler, RandomSampler):
        loader.sampler.generator.manual_seed(value)
    train_set.epoch.fill_(epoch)


def _check_readable(batch: dict) -> None:
    bad = [e for e in batch["error"] if e]
    if bad:
        raise RuntimeError(
            f"{len(bad)} training image(s) could not be read ({bad[0]}); rerun ingest"
        )


def train_model(
    cfg: Config,
    manifest: pd.DataFrame,
    model_dir: Path,
    last_dir: Path,
    epoch_log: EpochLog | None = None,
    init_from: Path | None = None,
) -> TrainResult:
    """Train on the manifest's train split; keep the best (val loss) in ``model_dir``.

    ``init_from``: a model folder whose weights training starts from (`model.warm_start`)."""
    dist = Distributed.from_env()
    device = _start_distributed(dist, resolve_device(cfg.train.device))
    try:
        return _train(cfg, manifest, model_dir, last_dir, dist, device, epoch_log, init_from)
    finally:
        if dist.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _train(
    cfg: Config,
    manifest: pd.DataFrame,
    model_dir: Path,
    last_dir: Path,
    dist: Distributed,
    device: torch.device,
    epoch_log: EpochLog | None,
    init_from: Path | None,
) -> TrainResult:
    seed_everything(cfg.train.seed)
    method = get_method(cfg.train.method)
    classes = known_classes(manifest)
    multi = is_multi_label(manifest["label"])
    if multi and not method.multi_label:
        raise ValueError(
            f"train.method: {method.name} picks one class per image and cannot learn images "
            "with several labels (the labels CSV has some); use sigmoid_bce"
        )
    net = create_model(
        cfg.model.backbone,
        method.num_outputs(len(classes)),
        cfg.model.in_chans,
        cfg.model.pretrained,
        cfg.model.pretrained_file,
    )
    spec = build_spec(
        net,
        cfg.model.backbone,
        classes,
        method.name,
        method.num_outputs(len(classes)),
        cfg.model.image_size,
        cfg.model.in_chans,
    )
    if init_from is not None:
        fresh = warm_start(net, init_from, spec)
        log.info("warm start from %s; classes with fresh head rows: %s", init_from, fresh or "none")
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    net.to(device, memory_format=memory_format)
    check_input_size(net, spec.image_size, spec.in_chans)

    train_rows = _rows_for(method, manifest, "train")
    val_rows = _rows_for(method, manifest, "val")
    if train_rows.empty:
        raise ValueError("the train split is empty: add images or lower data.val/test_fraction")
    if val_rows.empty:
        log.warning("the val split is empty: the last epoch is kept as the best model")
    pretrained = cfg.model.pretrained or cfg.model.pretrained_file is not None
    few_images = small_train_warning(train_rows, pretrained or init_from is not None)
    if few_images and dist.main:
        log.warning(few_images)
    start = time.perf_counter()
    augment = train_transform(spec, cfg.train.augment, cfg.train.seed + dist.rank)
    train_set = _EpochSeeded(
        _dataset(train_rows, classes, multi, augment, spec, cfg, dist), cfg.train.seed, dist.rank
    )
    train_dl = _loader(train_set, cfg, True, device, dist)
    val_dl = _loader(
        _dataset(val_rows, classes, multi, eval_transform(spec), spec, cfg, dist),
        cfg,
        False,
        device,
        dist,
    )
    decode_seconds = time.perf_counter() - start

    model: torch.nn.Module = net
    if dist.world > 1:
        model = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
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
        "training %s (%s) on %s%s: %d train / %d val images, %d classes, %d loader workers",
        cfg.model.backbone,
        method.name,
        device,
        f" x {dist.world} processes" if dist.world > 1 else "",
        len(train_rows),
        len(val_rows),
        len(classes),
        train_dl.num_workers,
    )
    folder = resume_dir(cfg, pd.concat([train_rows, val_rows]), dist.world)
    with state_folder(folder, [model_dir, last_dir], dist.main):
        state = load_state(
            folder, net, optimizer, scheduler, scaler, spec, model_dir if dist.main else None
        )
        best_loss, best_epoch, history, done = math.inf, 0, [], 0
        if state is not None:
            best_loss, best_epoch, history, done = (
                state["best_loss"],
                state["best_epoch"],
                state["history"],
                state["epoch"],
            )
            log.info("resuming from %s at epoch %d/%d", folder, done + 1, cfg.train.epochs)
            if dist.main:
                save_model_dir(last_dir, weights_file(folder, done), spec)
        log_id = None if state is None else state.get("epoch_log_id")
        if epoch_log is not None and dist.main:
            log_id = epoch_log.start(log_id, history)
        earlier_seconds = history[-1]["seconds"] if history else 0.0
        epoch = done
        per_epoch = (len(train_dl.sampler) - int(train_dl.drop_last)) * dist.world  # all processes
        with image_bar(
            cfg.train.epochs * per_epoch, "training", done * per_epoch, dist.main
        ) as bar:
            try:
                for epoch in range(done + 1, cfg.train.epochs + 1):
                    _start_epoch(train_dl, train_set, epoch)
                    bar.set_description(f"epoch {epoch}/{cfg.train.epochs}")
                    epoch_start = time.perf_counter()
                    total = _train_epoch(
                        model,
                        train_dl,
                        bar,
                        dist.world,
                        method,
                        spec,
                        cfg,
                        optimizer,
                        scheduler,
                        scaler,
                        autocast,
                        loss_kwargs,
                    )
                    epoch_seconds = time.perf_counter() - epoch_start
                    train_loss, seen = _all_sum(total, dist)
                    val_loss = _evaluate_loss(
                        net, val_dl, method, spec, cfg, autocast, loss_kwargs, dist
                    )
                    row = {
                        "epoch": epoch,
                        "train_loss": train_loss / seen,
                        "val_loss": val_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "images_per_s": seen / epoch_seconds,
                        "seconds": earlier_seconds + time.perf_counter() - start,
                    }
                    history.append(row)
                    log.info(
                        "epoch %d: train_loss %.4f val_loss %.4f (%.0f images/s)",
                        epoch,
                        row["train_loss"],
                        val_loss,
                        row["images_per_s"],
                    )
                    improved = math.isnan(val_loss) or val_loss < best_loss
                    if improved:
                        best_loss, best_epoch = val_loss, epoch
                    if dist.main:
                        outputs = [model_dir, last_dir] if improved else [last_dir]
                        progress = {
                            "epoch": epoch,
                            "best_epoch": best_epoch,
                            "best_loss": best_loss,
                            "history": history,
                            "epoch_log_id": log_id,
                        }
                        with signals_deferred():  # a stop now still reports the epoch just saved
                            save_state(
                                folder, net, spec, outputs, optimizer, scheduler, scaler, progress
                            )
                            done = epoch
                        if epoch_log is not None:  # after the save: a slow tracker delays no state
                            epoch_log.log_epoch(row)
            except (KeyboardInterrupt, SystemExit):
                if dist.main:
                    log.warning(
                        "training stopped in epoch %d/%d; %s",
                        epoch,
                        cfg.train.epochs,
                        f"rerun to resume from epoch {done + 1} (state in {folder})"
                        if done
                        else "no epoch was finished, a rerun starts from scratch",
                    )
                raise
    steady = history[1:] or history
    return TrainResult(
        spec,
        best_epoch,
        best_loss,
        earlier_seconds + time.perf_counter() - start,
        len(train_rows),
        len(val_rows),
        str(device),
        dist.world,
        decode_seconds,
        float(np.mean([row["images_per_s"] for row in steady])),
        history,
    )


def _all_sum(values: torch.Tensor, dist: Distributed) -> list[float]:
    """Sum over processes (a no-op alone): one host sync per epoch, not per step."""
    if dist.world > 1:
        torch_dist.all_reduce(values)
    return values.tolist()


def _train_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    bar: tqdm,
    world: int,
    method: Method,
    spec: ModelSpec,
    cfg: Config,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    autocast,
    loss_kwargs: dict,
) -> torch.Tensor:
    """One pass over this process's shard; returns (loss sum, images) on the device.

    ``bar`` counts the images of all ``world`` processes (they step together). No per-step
    host sync: the loss is read back only for a progress bar on a terminal.
    """
    device = next(model.parameters()).device
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for step, batch in enumerate(loader):
        _check_readable(batch)
        images = model_input(batch["image"], spec, device, cfg.train.channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        if method.uses_unknown:
            images, labels = mix_unknowns(images, labels, cfg.train.mixed_unknowns)
        with autocast:
            logits = model(images)
        loss = method.loss(logits, labels, **loss_kwargs)
        optimizer_step(loss, optimizer, scaler)
        scheduler.step()
        total[0] += loss.detach() * len(labels)
        total[1] += len(labels)
        bar.update(len(labels) * world)
        if not bar.disable and step % 25 == 0:
            bar.set_postfix(loss=f"{(total[0] / total[1]).item():.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return total


@torch.no_grad()
def _evaluate_loss(
    model: torch.nn.Module,
    loader: DataLoader,
    method: Method,
    spec: ModelSpec,
    cfg: Config,
    autocast,
    loss_kwargs: dict,
    dist: Distributed,
) -> float:
    """Mean validation loss over every process's shard (nan for an empty split)."""
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # weighted loss sum, weight
    for batch in loader:
        _check_readable(batch)
        labels = batch["label"].to(device, non_blocking=True)
        images = model_input(batch["image"], spec, device, cfg.train.channels_last)
        with autocast:
            logits = model(images)
        weight = sample_weights(labels, loss_kwargs["unknown_weight"]).sum()
        total[0] += method.loss(logits, labels, **loss_kwargs).detach() * weight
        total[1] += weight
    loss_sum, weight = _all_sum(total, dist)
    return loss_sum / weight if weight else math.nan
