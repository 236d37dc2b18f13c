"""A small data set, as a user's first own one: the stages say that the numbers will be
poor or rough and what to do, and the bars count images over the whole training."""

from __future__ import annotations

import io
import logging
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from opensig.config import load_config
from opensig.data.manifest import read_manifest, split_rows
from opensig.stages import HERE, evaluate, ingest, tune
from opensig.train import train_model
from tests.conftest import write_params

pytestmark = pytest.mark.e2e

PER_FOLDER = 20  # images per class and unknown source: 200 in all
EPOCHS = 2


class Terminal(io.StringIO):
    """stderr as a terminal, so that tqdm draws its bars (it skips non-terminals)."""

    def isatty(self) -> bool:
        return True


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> dict:
    """ingest, train, tune and evaluate on a subset of the digits at their own 32 px (the
    demo's size): what they logged, drew on a terminal, and the split sizes."""
    root = tmp_path_factory.mktemp("small")
    for folder in sorted(p for p in digits_data.glob("*/*") if p.is_dir()):
        target = root / "data" / folder.relative_to(digits_data)
        target.mkdir(parents=True)
        for image in sorted(folder.iterdir())[:PER_FOLDER]:
            shutil.copy(image, target / image.name)
    write_params(root, {"model": {"image_size": 32}, "train": {"epochs": EPOCHS}})
    collected, terminal = Collected(), Terminal()
    logger = logging.getLogger("opensig")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "stderr", terminal)
        logger.addHandler(collected)
        try:
            cfg = load_config()
            ingest(cfg)
            manifest = read_manifest(HERE.manifest, cfg.data.root)
            train_model(cfg, manifest, HERE.model_dir, HERE.last_dir)
            with warnings.catch_warnings():  # images at the model's size reach torch as is
                warnings.filterwarnings("error", message=".*NumPy array is not writable")
                tune(cfg)
                evaluate(cfg)
        finally:
            logger.removeHandler(collected)
    sizes = {split: len(split_rows(manifest, split)) for split in ("train", "val")}
    return {"warnings": collected.messages, "terminal": terminal.getvalue(), **sizes}


def test_training_from_scratch_on_few_images_warns(small: dict) -> None:
    [warning] = [w for w in small["warnings"] if w.startswith("train split")]
    assert "under 300 images in class(es) '" in warning
    assert "model.pretrained: true" in warning and "model.pretrained_file" in warning


def test_a_small_test_split_warns_which_metrics_are_rough(small: dict) -> None:
    test_warnings = [w for w in small["warnings"] if w.startswith("test split")]
    assert any("under 30 images in class(es)" in w for w in test_warnings)
    assert any("unknown images (under 100)" in w for w in test_warnings)
    assert any("novel.*" in w for w in test_warnings)  # 8 and 9 are held out: 40 images


def test_bars_count_images_over_the_whole_training(small: dict) -> None:
    drawn = small["terminal"]
    whole = EPOCHS * small["train"]  # one bar for every epoch's images: its ETA is the end
    assert f"epoch 1/{EPOCHS}:   0%|" in drawn and f"| 0/{whole} [" in drawn
    assert f"epoch {EPOCHS}/{EPOCHS}:" in drawn
    assert "?img/s" in drawn and "it/s" not in drawn
    assert f"scoring:   0%|          | 0/{small['val']} [" in drawn  # tune scores val images


def test_a_last_batch_of_one_image_is_dropped_not_fatal(
    tmp_path: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BatchNorm cannot train on one image: a split of n images with batch size n - 1 ends
    every epoch with a batch of one, which must not stop the training (it did)."""
    for folder in sorted(p for p in digits_data.glob("*/*") if p.is_dir()):
        target = tmp_path / "data" / folder.relative_to(digits_data)
        target.mkdir(parents=True)
        for image in sorted(folder.iterdir())[:6]:
            shutil.copy(image, target / image.name)
    write_params(tmp_path, {"train": {"epochs": 1}})
    monkeypatch.chdir(tmp_path)
    ingest(load_config())
    manifest = read_manifest(HERE.manifest, load_config().data.root)
    n_train = len(split_rows(manifest, "train"))
    write_params(tmp_path, {"train": {"epochs": 1, "batch_size": n_train - 1}})
    result = train_model(load_config(), manifest, HERE.model_dir, HERE.last_dir)
    assert len(result.history) == 1 and (HERE.model_dir / "weights.safetensors").is_file()
