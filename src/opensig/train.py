"""The training loop: AdamW + warm-up/cosine, AMP on GPU, best-by-val-loss and last checkpoints.

``_train`` reads the config once, builds the model, the ``TrainingStep`` (``opensig.step``:
batch -> forward -> loss, the same in the training and the validation pass, both losses
averaged per unit of weight), the loaders and the optimizer, and hands them to ``_Loop``,
which runs the epochs and keeps its bookkeeping in one ``opensig.resume.Progress``.

The time should go into the model's forward and backward passes: images are decoded once
(``opensig.data.cache``), the loop never waits on the host per step (no ``.item()``), and on
GPU it runs in bf16/fp16 with channels-last tensors fed from pinned memory by worker
processes. Under ``torchrun`` it trains with DistributedDataParallel: every process takes a
shard of each epoch, and only rank 0 writes checkpoints and reports.

A stopped run (Ctrl-C, SIGTERM, SIGKILL, a lost machine) resumes when rerun, from the state
rank 0 saves after every epoch (``opensig.resume``). No RNG state is saved because none is
carried from one epoch to the next: every epoch reseeds python, numpy and torch, the shuffle
order and the augmentation (``opensig.data.augment``: batched in the training process, the
loader workers draw nothing) from (train.seed, epoch, rank). Epoch k thus draws the same
numbers after a restart as after epoch k-1, and on CPU a resumed run ends with the
uninterrupted run's weights, on a machine that runs the same kernels (``opensig.numerics``,
in the report).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from opensig.config import Config, ModelConfig, TrainConfig
from opensig.data import cache
from opensig.data.augment import BatchAugment
from opensig.data.dataset import ImageDataset, loader_workers
from opensig.data.manifest import is_multi_label, known_classes, label_targets, split_rows
from opensig.data.prefetch import overlapped
from opensig.data.split import small_train_warning
from opensig.io import signals_deferred
from opensig.labels import UNKNOWN_LABEL
from opensig.methods import Method, get_method
from opensig.model import (
    ModelSpec,
    build_spec,
    check_input_size,
    coarse_input_warning,
    create_model,
    resolve_device,
    save_model_dir,
    warm_start,
)
from opensig.numerics import numerics
from opensig.progress import image_bar
from opensig.resume import (
    Progress,
    load_state,
    resume_dir,
    save_state,
    state_folder,
    weights_file,
)
from opensig.step import EpochLoss, StepOptions, TrainingStep, mean_loss

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
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
    numerics: dict = field(default_factory=dict)  # what repeats it bit for bit (opensig.numerics)
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


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A 32-bit seed that depends on its arguments only (``stream`` 0: python, numpy, torch
    and the shuffle order; 1: the augmentation, so that its draws are not torch's own)."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, rank, stream]).generate_state(1)[0])


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01):
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(
    trained: torch.nn.Module, train: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``trained`` (the net, and the rotation head when there is one) with the
    warm-up/cosine schedule, stepped once per training step."""
    optimizer = torch.optim.AdamW(
        trained.parameters(), lr=train.lr, weight_decay=train.weight_decay
    )
    steps = train.epochs * steps_per_epoch
    warmup = round(train.warmup_epochs * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))


def _network(
    model: ModelConfig, method: Method, classes: list[str], init_from: Path | None
) -> tuple[torch.nn.Module, ModelSpec]:
    """The timm model with a head for ``method`` and ``classes``, and its spec; warm-started
    from ``init_from`` (a model folder) when given."""
    outputs = method.num_outputs(len(classes))
    net = create_model(
        model.backbone, outputs, model.in_chans, model.pretrained, model.pretrained_file
    )
    spec = build_spec(
        net, model.backbone, classes, method.name, outputs, model.image_size, model.in_chans
    )
    if init_from is not None:
        fresh = warm_start(net, init_from, spec)
        log.info("warm start from %s; classes with fresh head rows: %s", init_from, fresh or "none")
    return net, spec


def _wrapper(
    dist: Distributed, device: torch.device, compile_model: bool
) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """What the training forward runs through: DDP under torchrun, torch.compile if asked."""

    def wrap(net: torch.nn.Module) -> torch.nn.Module:
        model = net
        if dist.world > 1:
            model = DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None
            )
        return torch.compile(model) if compile_model else model

    return wrap


def _rows_for(method: Method, df: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = split_rows(df, split)
    return (
        rows if method.uses_unknown else rows[rows["label"] != UNKNOWN_LABEL].reset_index(drop=True)
    )


def _split_rows(
    method: Method, manifest: pd.DataFrame, from_weights: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and val rows ``method`` trains on (an error if there is nothing to train on;
    warnings for no val split, or few images with no weights to start from: rank 0 only)."""
    train_rows, val_rows = _rows_for(method, manifest, "train"), _rows_for(method, manifest, "val")
    if train_rows.empty:
        raise ValueError("the train split is empty: add images or lower data.val/test_fraction")
    if val_rows.empty:
        log.warning("the val split is empty: the last epoch is kept as the best model")
    few_images = small_train_warning(train_rows, from_weights)
    if few_images and is_main_process():
        log.warning(few_images)
    return train_rows, val_rows


@dataclass(frozen=True)
class _Images:
    """How rows become a dataset: labels over ``classes``, images decoded as ingest checked
    them (up to ``max_pixels``), read from the decode-once cache in ``cache_dir`` when there
    is one and it holds them (rank 0 fills it up to ``cache_max_bytes``, the others wait)."""

    classes: list[str]
    multi_label: bool
    spec: ModelSpec
    cache_dir: Path | None
    cache_max_bytes: int
    max_pixels: int
    dist: Distributed

    def dataset(self, rows: pd.DataFrame) -> ImageDataset:
        decoded = None
        spec, dist = self.spec, self.dist
        if self.cache_dir is not None and not rows.empty:
            paths, hashes = rows["path"].tolist(), rows["hash"].tolist()
            if dist.main:
                decoded = cache.prepare(
                    paths,
                    hashes,
                    spec.image_size,
                    spec.in_chans,
                    self.cache_dir,
                    self.cache_max_bytes,
                    self.max_pixels,
                )
            if dist.world > 1:
                torch_dist.barrier()
                if not dist.main:
                    folder = cache.CacheFolder.of(self.cache_dir, spec.image_size, spec.in_chans)
                    decoded = folder.lookup(hashes)
        return ImageDataset(
            rows["path"].tolist(),
            label_targets(rows["label"], self.classes, self.multi_label),
            spec.image_size,
            spec.in_chans,
            decoded,
            self.max_pixels,
        )


def _loader(
    dataset: Dataset, train: TrainConfig, shuffle: bool, device: torch.device, dist: Distributed
) -> DataLoader:
    """The shuffling sampler gets a generator of its own, reseeded every epoch: the loader's
    generator also seeds the workers, but only when they start (once, with persistent ones)."""
    workers = loader_workers(train.num_workers, device, dist.world)
    sampler: DistributedSampler | RandomSampler | None = None
    if dist.world > 1:
        sampler = DistributedSampler(
            dataset, dist.world, dist.rank, shuffle=shuffle, seed=train.seed
        )
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    per_process = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=train.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(train.seed),
        # a last training batch of one image would stop BatchNorm ("more than 1 value per
        # channel"): drop it (another image each epoch, the order being shuffled)
        drop_last=shuffle and per_process > 1 and per_process % train.batch_size == 1,
    )


def _start_epoch(
    loader: DataLoader, augment: BatchAugment | None, seed: int, rank: int, epoch: int
) -> None:
    """Make everything random in this epoch a function of (seed, epoch, rank) alone."""
    value = epoch_seed(seed, epoch, rank)
    seed_everything(value)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif isinstance(loader.sampler, RandomSampler):
        loader.sampler.generator.manual_seed(value)
    if augment is not None:
        augment.seed(epoch_seed(seed, epoch, rank, stream=1))


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
    """The config is read here, once; everything below gets the pieces it uses."""
    train = cfg.train
    seed_everything(train.seed)
    method = get_method(train.method)
    classes = known_classes(manifest)
    multi = is_multi_label(manifest["label"])
    if multi and not method.multi_label:
        raise ValueError(
            f"train.method: {method.name} picks one class per image and cannot learn images "
            "with several labels (the labels CSV has some); use sigmoid_bce"
        )
    net, spec = _network(cfg.model, method, classes, init_from)
    step = TrainingStep(
        net,
        method,
        spec,
        device,
        StepOptions.of(train),
        _wrapper(dist, device, train.compile),
        BatchAugment(**train.augment.model_dump()),
    )
    check_input_size(net, spec.image_size, spec.in_chans)
    coarse = coarse_input_warning(net, spec.backbone, spec.image_size)
    if coarse and dist.main:
        log.warning(coarse)

    from_weights = cfg.model.pretrained or cfg.model.pretrained_file is not None
    train_rows, val_rows = _split_rows(method, manifest, from_weights or init_from is not None)
    start = time.perf_counter()
    cache_dir = cfg.data.cache_dir if train.decode_cache else None
    cache_cap = cache.max_bytes(cache_dir, train.decode_cache_max_gb) if cache_dir else 0
    images = _Images(classes, multi, spec, cache_dir, cache_cap, cfg.data.max_image_pixels, dist)
    train_dl = _loader(images.dataset(train_rows), train, True, device, dist)
    val_dl = _loader(images.dataset(val_rows), train, False, device, dist)
    decode_seconds = time.perf_counter() - start
    optimizer, scheduler = _optimizer(step.trained, train, len(train_dl))
    log.info(
        "training %s (%s) on %s%s: %d train / %d val images, %d classes, %d loader workers",
        spec.backbone,
        method.name,
        device,
        f" x {dist.world} processes" if dist.world > 1 else "",
        len(train_rows),
        len(val_rows),
        len(classes),
        train_dl.num_workers,
    )
    loop = _Loop(
        step=step,
        seed=train.seed,
        train_dl=train_dl,
        val_dl=val_dl,
        optimizer=optimizer,
        scheduler=scheduler,
        dist=dist,
        folder=resume_dir(cfg, pd.concat([train_rows, val_rows]), dist.world),
        model_dir=model_dir,
        last_dir=last_dir,
        epochs=train.epochs,
        epoch_log=epoch_log,
        start=start,
    )
    progress = loop.run()
    steady = progress.history[1:] or progress.history
    return TrainResult(
        spec=spec,
        best_epoch=progress.best_epoch,
        best_val_loss=progress.best_loss,
        seconds=time.perf_counter() - loop.start,
        n_train=len(train_rows),
        n_val=len(val_rows),
        device=str(device),
        world_size=dist.world,
        decode_seconds=decode_seconds,
        images_per_s=float(np.mean([row["images_per_s"] for row in steady])),
        numerics=numerics(device),
        history=progress.history,
    )


@dataclass(kw_only=True)
class _Loop:
    """The epochs of one training: each trains on this process's shard of the train set and
    measures the val loss over every shard; rank 0 then saves the state to resume from, the
    best model (val loss) in ``model_dir`` and the last in ``last_dir``, and reports the
    epoch to ``epoch_log``."""

    step: TrainingStep
    seed: int  # train.seed: with the epoch and rank, it seeds everything random in an epoch
    train_dl: DataLoader
    val_dl: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dist: Distributed
    folder: Path  # the resume state (opensig.resume)
    model_dir: Path
    last_dir: Path
    epochs: int
    epoch_log: EpochLog | None
    start: float  # the run's clock; a resumed run moves it back by the stopped run's time
    saved: int = field(default=0, init=False)  # the last epoch whose state is saved

    def run(self) -> Progress:
        """Resume from the saved state if there is one, then train the remaining epochs."""
        main = self.dist.main
        with state_folder(self.folder, [self.model_dir, self.last_dir], main):
            progress = self.resume()
            if self.epoch_log is not None and main:
                progress.epoch_log_id = self.epoch_log.start(
                    progress.epoch_log_id, progress.history
                )
            self.saved = epoch = progress.epoch
            trained = len(self.train_dl.sampler) - int(self.train_dl.drop_last)  # per process
            per_epoch = trained * self.dist.world
            with image_bar(self.epochs * per_epoch, "training", epoch * per_epoch, main) as bar:
                try:
                    for epoch in range(progress.epoch + 1, self.epochs + 1):
                        self.run_epoch(epoch, progress, bar)
                except (KeyboardInterrupt, SystemExit):
                    if main:
                        log.warning(
                            "training stopped in epoch %d/%d; %s",
                            epoch,
                            self.epochs,
                            f"rerun to resume from epoch {self.saved + 1} (state in {self.folder})"
                            if self.saved
                            else "no epoch was finished, a rerun starts from scratch",
                        )
                    raise
        return progress

    def run_epoch(self, epoch: int, progress: Progress, bar: tqdm) -> None:
        """Train and validate; record the epoch in ``progress``; rank 0 saves and reports it."""
        _start_epoch(self.train_dl, self.step.augment, self.seed, self.dist.rank, epoch)
        bar.set_description(f"epoch {epoch}/{self.epochs}")
        row = {"epoch": epoch, **self.losses(bar)}
        row["seconds"] = time.perf_counter() - self.start
        improved = progress.record(row)
        log.info(
            "epoch %d: train_loss %.4f val_loss %.4f (%.0f images/s)",
            epoch,
            row["train_loss"],
            row["val_loss"],
            row["images_per_s"],
        )
        if self.dist.main:
            with signals_deferred():  # a stop now still reports the epoch just saved
                self.save(progress, improved)
                self.saved = epoch
            if self.epoch_log is not None:  # after the save: a slow tracker delays no state
                self.epoch_log.log_epoch(row)

    def resume(self) -> Progress:
        """The saved state loaded into the model and optimizers (rank 0 puts its best and
        last models back), or a fresh Progress when there is none to resume."""
        step, main = self.step, self.dist.main
        progress = load_state(
            self.folder,
            step.evaluated,
            self.optimizer,
            self.scheduler,
            step.scaler,
            step.spec,
            self.model_dir if main else None,
            step.load_resume_state,
        )
        if progress is None:
            return Progress()
        log.info("resuming from %s at epoch %d/%d", self.folder, progress.epoch + 1, self.epochs)
        if main:
            save_model_dir(self.last_dir, weights_file(self.folder, progress.epoch), step.spec)
        self.start -= progress.seconds
        return progress

    def save(self, progress: Progress, improved: bool) -> None:
        """The epoch just recorded: weights (into the best model too if ``improved``),
        optimizer, scheduler and grad-scaler state, and the progress."""
        step = self.step
        outputs = [self.model_dir, self.last_dir] if improved else [self.last_dir]
        save_state(
            self.folder,
            step.evaluated,
            step.spec,
            outputs,
            self.optimizer,
            self.scheduler,
            step.scaler,
            progress,
            step.resume_state(),
        )

    def losses(self, bar: tqdm) -> dict:
        """One epoch's figures: train_loss, val_loss, lr, images_per_s (training only)."""
        epoch_start = time.perf_counter()
        losses = _train_epoch(
            self.step, self.train_dl, self.optimizer, self.scheduler, bar, self.dist.world
        )
        epoch_seconds = time.perf_counter() - epoch_start
        weighted, weight, seen = _all_sum(losses.sums, self.dist)
        return {
            "train_loss": mean_loss(weighted, weight),
            "val_loss": _evaluate_loss(self.step, self.val_dl, self.dist),
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": seen / epoch_seconds,
        }


def _all_sum(values: torch.Tensor, dist: Distributed) -> list[float]:
    """Sum over processes (a no-op alone): one host sync per epoch, not per step."""
    if dist.world > 1:
        torch_dist.all_reduce(values)
    return values.tolist()


def _train_epoch(
    step: TrainingStep,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    bar: tqdm,
    world: int = 1,
) -> EpochLoss:
    """One pass over this process's shard; its loss sums, on the device.

    ``bar`` counts the images of all ``world`` processes (they step together). No per-step
    host sync: the loss is read back only for a progress bar on a terminal.
    """
    step.train()
    losses = EpochLoss(step.device)
    with overlapped(loader, step.device) as batches:
        for index, batch in enumerate(batches):
            out = step(*step.prepare(batch))
            step.update(out["loss"], optimizer)
            scheduler.step()
            losses.add(out)
            bar.update(len(out["labels"]) * world)
            if not bar.disable and index % 25 == 0:
                bar.set_postfix(loss=f"{losses.mean():.4f}")
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
    return losses


@torch.no_grad()
def _evaluate_loss(step: TrainingStep, loader: DataLoader, dist: Distributed) -> float:
    """The validation loss over every process's shard, averaged as the train loss is (nan
    for an empty split)."""
    step.eval()
    losses = EpochLoss(step.device)
    with overlapped(loader, step.device) as batches:
        for batch in batches:
            losses.add(step(*step.prepare(batch)))
    weighted, weight, _ = _all_sum(losses.sums, dist)
    return mean_loss(weighted, weight)
