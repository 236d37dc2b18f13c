"""Training stopped mid-run resumes from its last saved epoch and ends as if never stopped.

Real processes and real signals: `opensig train` is SIGKILLed or SIGTERMed after it has saved
an epoch, every file left under artifacts/ must still load, and the rerun must finish the
remaining epochs only, with the weights of an uninterrupted run (CPU, bitwise).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

import opensig.resume
import opensig.train
from opensig.config import Config, load_config
from opensig.stages import HERE, ingest, train
from tests.conftest import write_params

pytestmark = pytest.mark.e2e

EPOCHS = 3
OVERRIDES = {"train": {"epochs": EPOCHS, "num_workers": 0}}
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
STATES = "artifacts/cache/train-state"


def start_train(root: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "opensig"), "train"], cwd=root, env=ENV, stdout=out, stderr=subprocess.STDOUT
        )


def run_train(root: Path) -> str:
    result = subprocess.run(
        [str(BIN / "opensig"), "train"], cwd=root, env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / HERE.model_dir / "weights.safetensors"))


def numerics(root: Path) -> dict:
    """What the train report says decided the floating-point path (opensig.numerics)."""
    return json.loads((root / HERE.train_report).read_text())["numerics"]


def history(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / HERE.train_plots / "train_history.csv")


def state_files(root: Path) -> list[Path]:
    return sorted((root / STATES).glob("*/trainer.pt"))


def wait_for_a_saved_epoch(root: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not state_files(root):
        assert proc.poll() is None, f"train ended before saving an epoch:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no epoch saved in 300 s"
        time.sleep(0.05)


def _index_rows(path: Path) -> None:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        db.execute("SELECT COUNT(*) FROM entries").fetchone()


def load_any(path: Path) -> None:
    """Read a file the way its consumer does; raises if it is truncated or corrupt."""
    readers = {
        ".safetensors": lambda p: load_file(str(p)),
        ".json": lambda p: json.loads(p.read_text()),
        ".pt": lambda p: torch.load(p, weights_only=True),
        ".parquet": pd.read_parquet,
        ".npy": np.load,
        ".lock": Path.read_bytes,  # the state folder's lock: no content, nothing to check
        ".sqlite": _index_rows,  # the decode cache's index
    }
    readers[path.suffix](path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    """An ingested project trained once without interruption (same params as the tests)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(digits_data, root / "data")
    write_params(root, OVERRIDES)
    subprocess.run([str(BIN / "opensig"), "ingest"], cwd=root, env=ENV, check=True)
    run_train(root)
    return root


@pytest.fixture
def ingested(project: Path, reference: Path) -> Path:
    """The test's project with the reference's params and manifest (paths are relative)."""
    write_params(project, OVERRIDES)
    (project / HERE.manifest).parent.mkdir(parents=True)
    shutil.copy(reference / HERE.manifest, project / HERE.manifest)
    return project


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_resumes_and_ends_as_uninterrupted(
    ingested: Path, reference: Path, sig: signal.Signals
) -> None:
    log = ingested / "killed.log"
    proc = start_train(ingested, log)
    wait_for_a_saved_epoch(ingested, proc, log)
    proc.send_signal(sig)
    returncode = proc.wait(timeout=120)

    output = log.read_text()
    if sig == signal.SIGKILL:
        assert returncode == -signal.SIGKILL
    else:
        assert returncode == 128 + signal.SIGTERM, output
        assert "train interrupted (SIGTERM)" in output
        assert "rerun to resume from epoch" in output
        assert not list((ingested / "artifacts").rglob("*.tmp")), "temp files left behind"
    for path in (ingested / "artifacts").rglob("*"):
        if path.is_file() and not path.name.endswith(".tmp"):  # SIGKILL may strand a temp file
            load_any(path)
    [state] = state_files(ingested)
    saved = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= saved < EPOCHS, "killed after the last epoch: nothing left to resume"

    shutil.rmtree(ingested / HERE.model_dir)  # what `dvc repro` does to the stage's outputs
    shutil.rmtree(ingested / "artifacts/checkpoints")
    output = run_train(ingested)

    assert f"resuming from {STATES}/{state.parent.name} at epoch {saved + 1}/{EPOCHS}" in output
    assert f"epoch {saved}:" not in output  # saved epochs are not trained again
    assert history(ingested)["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert history(ingested)[["train_loss", "val_loss"]].equals(
        history(reference)[["train_loss", "val_loss"]]
    )
    expected, resumed = weights(reference), weights(ingested)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert not list((ingested / STATES).iterdir()), "state kept after a finished run"
    # bitwise because both ran the same kernels on as many threads, as the reports say
    same_path = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": int(ENV["OMP_NUM_THREADS"]),  # tests/conftest.py: cores / workers
        "gpu": None,
        "cudnn": None,
    }
    assert numerics(ingested) == numerics(reference) == same_path


def stop_in_epoch_2(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train as if Ctrl-C were pressed as epoch 2 starts."""
    start_epoch = opensig.train._start_epoch

    def ctrl_c_in_epoch_2(*args: object) -> None:
        *_, epoch = args
        if epoch == 2:
            raise KeyboardInterrupt
        start_epoch(*args)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(opensig.train, "_start_epoch", ctrl_c_in_epoch_2)
        train(cfg)


def test_stopped_run_resumes_with_loader_workers_and_restarts_on_new_params(
    project: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process (Ctrl-C at the start of epoch 2), with loader workers and a moving average
    of the weights (saved: the average; resumed: the trained weights and the step count too);
    stale temp files are swept; changed params make the saved state stale."""
    caplog.set_level(logging.INFO, logger="opensig")
    write_params(project, {"train": {"epochs": 2, "num_workers": 2, "ema_decay": 0.9}})
    cfg = load_config()
    ingest(cfg)
    train(cfg)
    uninterrupted = weights(project)
    assert not list(Path(STATES).iterdir())

    stop_in_epoch_2(cfg, monkeypatch)
    assert "rerun to resume from epoch 2" in caplog.text
    [stopped] = state_files(project)
    stale = [stopped.parent / ".weights-0002.safetensors.x1.tmp", HERE.model_dir / ".x.tmp"]
    for path in stale:
        path.write_bytes(b"half")

    caplog.clear()
    train(cfg)
    assert "resuming from" in caplog.text and "at epoch 2/2" in caplog.text
    assert not any(path.exists() for path in stale)
    resumed = weights(project)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    stop_in_epoch_2(cfg, monkeypatch)
    write_params(project, {"train": {"epochs": 2, "num_workers": 2, "ema_decay": 0.9, "lr": 1e-3}})
    caplog.clear()
    train(load_config())
    assert "params or data changed" in caplog.text and "resuming" not in caplog.text
    assert history(project)["epoch"].tolist() == [1, 2]
    assert not list(Path(STATES).iterdir())


def test_a_second_training_of_the_same_run_stops_and_leaves_the_first_alone(
    project: Path, reference: Path
) -> None:
    """Same data and params (the same state folder): the second `opensig train` must not
    train into the first's checkpoints; it stops, naming the folder, before any work."""
    write_params(project, {"train": {"epochs": 50, "num_workers": 0}})  # long enough to overlap
    (project / HERE.manifest).parent.mkdir(parents=True)
    shutil.copy(reference / HERE.manifest, project / HERE.manifest)
    log = project / "first.log"
    first = start_train(project, log)
    try:
        wait_for_a_saved_epoch(project, first, log)
        second = subprocess.run(
            [str(BIN / "opensig"), "train"], cwd=project, env=ENV, capture_output=True, text=True
        )
        assert first.poll() is None, "the first training did not outlive the second"
        assert second.returncode != 0
        [state] = state_files(project)
        assert f"{STATES}/{state.parent.name}: another training on the same data" in second.stderr
        assert "wait for it, or stop it and rerun to resume" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
        assert "rerun to resume from epoch" in log.read_text()  # the first's state is intact
    finally:
        first.kill()


def test_new_params_discard_stopped_states_but_not_running_ones(tmp_path: Path) -> None:
    """Runs with other params may share a cache_dir: only states nobody holds are stale."""
    states = tmp_path / "train-state"
    running, stopped, ours = states / "running", states / "stopped", states / "ours"
    for folder in (running, stopped):
        folder.mkdir(parents=True)
        (folder / opensig.resume.STATE_FILE).write_bytes(b"state")
    with FileLock(running / opensig.resume.STATE_LOCK, timeout=0):  # as a live run holds it
        with opensig.resume.state_folder(ours, [], main=True):
            assert running.is_dir() and not stopped.exists()
            second = opensig.resume.state_folder(ours, [], main=True)
            with pytest.raises(RuntimeError, match="another training on the same data"), second:
                pass
        assert not ours.exists()  # removed once its training ended
    assert (running / opensig.resume.STATE_FILE).read_bytes() == b"state"
