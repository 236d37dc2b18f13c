"""The resume state's bookkeeping: one Progress, saved and loaded by opensig.resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opensig.model import ModelSpec
from opensig.resume import STATE_FILE, Progress, load_state, save_state

SPEC = ModelSpec("hand", ["a", "b"], "sigmoid_bce", 2, 8, 1, [0.5], [0.5])


def _training() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    return net, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)


def _rows(*val_losses: float) -> list[dict]:
    return [
        {"epoch": n, "train_loss": 1.0 / n, "val_loss": v, "lr": 0.1, "seconds": 2.0 * n}
        for n, v in enumerate(val_losses, 1)
    ]


def test_progress_keeps_the_best_epoch_by_val_loss() -> None:
    progress = Progress()
    assert [progress.record(row) for row in _rows(0.5, 0.3, 0.4)] == [True, True, False]
    assert (progress.epoch, progress.best_epoch, progress.best_loss) == (3, 2, 0.3)
    assert progress.seconds == 6.0 and Progress().seconds == 0.0
    no_val = Progress()
    assert all(no_val.record(row) for row in _rows(math.nan, math.nan))  # the last is kept
    assert no_val.best_epoch == 2


def test_progress_round_trips_through_save_and_load(tmp_path: Path) -> None:
    net, optimizer, scheduler = _training()
    net(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    progress = Progress(epoch_log_id="run-1")
    for row in _rows(0.5, 0.3, 0.4):  # saved every epoch, as the loop does
        with torch.no_grad():
            net.bias.fill_(row["epoch"])  # each epoch's weights tell which epoch they are
        progress.record(row)
        step_state = {"updates": row["epoch"]}  # what TrainingStep.resume_state gives
        save_state(
            tmp_path,
            net,
            SPEC,
            [tmp_path / "last"],
            optimizer,
            scheduler,
            None,
            progress,
            step_state,
        )

    other, other_optimizer, other_scheduler = _training()
    best, restored = tmp_path / "best", {}
    loaded = load_state(
        tmp_path, other, other_optimizer, other_scheduler, None, SPEC, best, restored.update
    )
    assert loaded == progress
    assert restored == {"updates": 3}
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters(), strict=True))
    assert other.bias.tolist() == [3.0, 3.0]  # the last epoch's weights, to train on from
    assert other_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert other_scheduler.last_epoch == scheduler.last_epoch == 1
    assert load_file(best / "weights.safetensors")["bias"].tolist() == [2.0, 2.0]  # the best
    assert sorted(p.name for p in tmp_path.glob("weights-*")) == [
        "weights-0002.safetensors",
        "weights-0003.safetensors",
    ]


def test_a_state_from_an_older_opensig_starts_from_scratch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before Progress, the state held its keys flat and no format (train loss per image)."""
    net, optimizer, scheduler = _training()
    old = {"epoch": 1, "best_epoch": 1, "best_loss": 0.5, "history": _rows(0.5)}
    old |= {"epoch_log_id": None, "optimizer": optimizer.state_dict()}
    torch.save({**old, "scheduler": scheduler.state_dict()}, tmp_path / STATE_FILE)
    caplog.set_level(logging.INFO, logger="opensig")
    assert load_state(tmp_path, net, optimizer, scheduler, None, SPEC, None, print) is None
    assert "saved by another opensig version (format 1" in caplog.text
    assert "training from scratch" in caplog.text


def test_no_state_no_progress(tmp_path: Path) -> None:
    net, optimizer, scheduler = _training()
    assert load_state(tmp_path, net, optimizer, scheduler, None, SPEC, None, print) is None
