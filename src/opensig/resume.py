"""Resume state: a stopped training (Ctrl-C, SIGTERM, SIGKILL, a lost machine) goes on when rerun.

After every epoch rank 0 saves the weights (those validated: with ``train.ema_decay`` their
moving average, the trained weights then going into the state file), the optimizer, scheduler
and grad-scaler state and the loop's progress under ``data.cache_dir/train-state/<fingerprint>``.
That folder is outside the DVC outputs because ``dvc repro`` deletes a stage's outputs before it
reruns the stage. The
fingerprint covers the train/val rows, the model and train params and the world size: change
any and the next run starts afresh. Each file is written atomically and the state file, written
last, names the weights it belongs to, so a kill at any instant leaves a loadable state. A run
holds a lock on its folder, so no second run trains into it or deletes it.

The loop's bookkeeping is one ``Progress``: epochs done, the best epoch and its val loss, the
history rows, the id of the epoch log (MLflow run) it reports to. A state saved in another
format (``STATE_FORMAT``; the older one, without the key, averaged the train loss per image)
is not resumed: the run starts from scratch and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_model, save_model

from opensig.config import Config
from opensig.io import atomic_write, remove_temp_files
from opensig.model import ModelSpec, save_model_dir

log = logging.getLogger(__name__)

STATE_FILE = "trainer.pt"
STATE_LOCK = "trainer.lock"  # held by the run training from this folder
STATE_FORMAT = 3  # 3: the step's state (EMA); 2: Progress, losses per unit of weight; 1: older


@dataclass
class Progress:
    """Where a training is: what the loop needs to go on after a stop, saved every epoch."""

    epoch: int = 0  # epochs done
    best_epoch: int = 0
    best_loss: float = math.inf
    history: list[dict] = field(default_factory=list)  # one row per epoch done
    epoch_log_id: str | None = None  # where the epochs are reported (EpochLog.start)

    def record(self, row: dict) -> bool:
        """Add a finished epoch's history row (``epoch``, ``val_loss``, ...); True when its
        val loss is the best so far (every epoch is when there is no val split: nan)."""
        self.history.append(row)
        self.epoch = row["epoch"]
        loss = row["val_loss"]
        improved = math.isnan(loss) or loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch = loss, self.epoch
        return improved

    @property
    def seconds(self) -> float:
        """Training time of the epochs done (the last row's running total)."""
        return self.history[-1]["seconds"] if self.history else 0.0


def resume_dir(cfg: Config, rows: pd.DataFrame, world: int) -> Path:
    """The state folder of a run on these rows with these params: its name is their fingerprint."""
    digest = hashlib.sha256(rows[["path", "hash", "label", "split"]].to_csv(index=False).encode())
    params = {
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "world": world,
    }
    digest.update(json.dumps(params, sort_keys=True).encode())
    return Path(cfg.data.cache_dir) / "train-state" / digest.hexdigest()[:16]


def weights_file(folder: Path, epoch: int) -> Path:
    return folder / f"weights-{epoch:04d}.safetensors"


@contextmanager
def state_folder(folder: Path, outputs: list[Path], main: bool) -> Iterator[None]:
    """Hold this run's state folder while it trains; remove it once training has finished.

    Rank 0 locks the folder, so a second run with the same fingerprint stops with a clear
    message, and drops what stopped runs left: half-written files, and states for other
    params or data unless a running training holds them (several runs may share a cache_dir).
    """
    if not main:
        yield
        return
    for other in sorted(p for p in folder.parent.glob("*") if p.is_dir() and p != folder):
        with suppress(Timeout), FileLock(other / STATE_LOCK, timeout=0):
            log.info("params or data changed: discarding the state of the stopped run in %s", other)
            shutil.rmtree(other, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / STATE_LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(
            f"{folder}: another training on the same data with the same params is running "
            "(it holds this state folder); wait for it, or stop it and rerun to resume"
        ) from None
    try:
        for directory in (folder, *outputs):
            removed = remove_temp_files(directory)
            if removed:
                log.info("removed %d half-written file(s) in %s", len(removed), directory)
        yield
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        lock.release()


def save_state(
    folder: Path,
    net: torch.nn.Module,
    spec: ModelSpec,
    outputs: list[Path],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    step_state: dict,
) -> None:
    """Weights first (written once, linked into the model folders ``outputs``), then the
    state file naming them (with ``step_state``: ``TrainingStep.resume_state``), then drop
    the weights no state names."""
    epoch, best_epoch = progress.epoch, progress.best_epoch
    weights = atomic_write(weights_file(folder, epoch), lambda tmp: save_model(net, str(tmp)))
    for directory in outputs:
        save_model_dir(directory, weights, spec)
    state = {
        **asdict(progress),
        "format": STATE_FORMAT,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step_state,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    atomic_write(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
    keep = {weights_file(folder, epoch), weights_file(folder, best_epoch)}
    for old in folder.glob("weights-*.safetensors"):
        if old not in keep:
            old.unlink(missing_ok=True)


def load_state(
    folder: Path,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    spec: ModelSpec,
    restore_best: Path | None,
    restore_step: Callable[[dict], None],
) -> Progress | None:
    """Load a stopped run's state into the model (``net``: the saved weights), the step
    (``restore_step`` gets what ``save_state`` got as ``step_state``) and the optimizers;
    its Progress, or None if there is none to resume (none saved, or saved in another
    format: start from scratch).

    ``restore_best`` (rank 0) gets the best weights so far back: ``dvc repro`` deletes the
    model folder before it reruns the stage. Tensors and plain values only (weights_only).
    """
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            log.warning(
                "the state in %s was saved by another opensig version (format %s, this one "
                "reads %d): training from scratch",
                folder,
                state.get("format", 1),
                STATE_FORMAT,
            )
            return None
        progress = Progress(**{f.name: state[f.name] for f in fields(Progress)})
        if restore_best is not None:
            save_model_dir(restore_best, weights_file(folder, progress.best_epoch), spec)
        load_model(net, str(weights_file(folder, progress.epoch)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_step(state["step"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    except Exception as err:
        raise RuntimeError(
            f"cannot resume from {folder} ({type(err).__name__}: {err}); "
            "delete that folder to train from scratch"
        ) from err
    return progress
