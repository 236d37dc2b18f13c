"""Tests for image decoding, the resize to the model's input and ImageDataset."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from opensig.data.dataset import ImageDataset, fit_to, model_input
from opensig.data.images import decode
from opensig.model import ModelSpec

SIZE = 16
MEAN = 0.5
STD = 0.25


def _spec(in_chans: int = 3) -> ModelSpec:
    return ModelSpec(
        backbone="test_resnet",
        classes=["a", "b"],
        method="sigmoid_bce",
        num_outputs=2,
        image_size=SIZE,
        in_chans=in_chans,
        mean=[MEAN] * in_chans,
        std=[STD] * in_chans,
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(height: int = 24, width: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_load_image_path_and_bytes(tmp_path: Path) -> None:
    array = _noise()
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)

    from_path = decode(path, 3)
    from_str = decode(str(path), 3)
    from_bytes = decode(path.read_bytes(), 3)
    assert from_path.shape == (24, 20, 3)
    assert from_path.dtype == np.uint8
    assert np.array_equal(from_path, array)
    assert np.array_equal(from_str, array)
    assert np.array_equal(from_bytes, array)


def test_load_image_grayscale_to_three_and_one_channel() -> None:
    gray = np.arange(24 * 20, dtype=np.uint8).reshape(24, 20)
    data = _png_bytes(Image.fromarray(gray, mode="L"))

    rgb = decode(data, 3)
    assert rgb.shape == (24, 20, 3)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], gray)

    one = decode(data, 1)
    assert one.shape == (24, 20, 1)
    assert np.array_equal(one[..., 0], gray)


def test_load_image_rgba_and_rgb_to_one_channel() -> None:
    """An opaque RGBA image keeps its colours; RGB to one channel is Pillow's luminance."""
    rgb = _noise()
    rgba = np.dstack([rgb, np.full((24, 20), 255, dtype=np.uint8)])
    from_rgba = decode(_png_bytes(Image.fromarray(rgba, mode="RGBA")), 3)
    assert from_rgba.shape == (24, 20, 3) and np.array_equal(from_rgba, rgb)
    grey = decode(_png_bytes(Image.fromarray(rgb)), 1)
    assert grey.shape == (24, 20, 1)
    assert np.array_equal(grey[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))


@pytest.mark.parametrize("in_chans", [1, 3])
def test_eval_preprocessing_shape_and_normalisation(tmp_path: Path, in_chans: int) -> None:
    value = 191
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 30, 3), value, dtype=np.uint8)).save(path)
    spec = _spec(in_chans)
    item = ImageDataset([path], None, SIZE, in_chans)[0]
    assert item["image"].shape == (SIZE, SIZE, in_chans) and item["image"].dtype == torch.uint8
    out = model_input(item["image"][None], spec, torch.device("cpu"))
    assert out.shape == (1, in_chans, SIZE, SIZE) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = (value / 255.0 - MEAN) / STD
    torch.testing.assert_close(out, torch.full_like(out, expected), atol=1e-5, rtol=0.0)
    assert model_input(item["image"][None], spec, torch.device("cpu"), False).is_contiguous()


def test_fit_to_resizes_to_the_square_input_and_keeps_an_image_at_that_size() -> None:
    image = _noise()
    resized = fit_to(image, SIZE)
    assert resized.shape == (SIZE, SIZE, 3) and resized.dtype == np.uint8
    assert np.array_equal(resized, fit_to(image, SIZE))  # deterministic
    at_size = _noise(SIZE, SIZE)
    assert fit_to(at_size, SIZE) is at_size


def test_image_dataset_reads_files(tmp_path: Path) -> None:
    """A path and raw bytes each give their own image's pixels, resized as fit_to does."""
    path = tmp_path / "ok.png"
    Image.fromarray(_noise()).save(path)
    data = _png_bytes(Image.fromarray(_noise(seed=1)))
    dataset = ImageDataset([path, data], [1, -1], SIZE, in_chans=3)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first["error"] == "" and second["error"] == ""
    assert first["label"] == 1 and second["label"] == -1
    assert first["image"].shape == (SIZE, SIZE, 3)
    assert np.array_equal(first["image"].numpy(), fit_to(_noise(), SIZE))
    assert np.array_equal(second["image"].numpy(), fit_to(_noise(seed=1), SIZE))


def test_image_dataset_default_labels_unknown(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.fromarray(_noise()).save(path)
    dataset = ImageDataset([path], None, SIZE, in_chans=3)
    assert dataset[0]["label"] == -1


@pytest.mark.parametrize("in_chans", [1, 3])
def test_image_dataset_unreadable_file(tmp_path: Path, in_chans: int) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    missing = tmp_path / "missing.png"
    dataset = ImageDataset([bad, missing, b"\x89PNG garbage"], [0, 1, -1], SIZE, in_chans)
    for index, label in enumerate([0, 1, -1]):
        item = dataset[index]
        assert item["label"] == label
        assert item["error"]
        assert item["image"].shape == (SIZE, SIZE, in_chans)
        assert torch.count_nonzero(item["image"]) == 0
    assert "UnidentifiedImageError" in dataset[0]["error"]
    assert "FileNotFoundError" in dataset[1]["error"]


@pytest.mark.parametrize("in_chans", [1, 3])
def test_image_at_the_model_size_reaches_torch_without_a_warning(
    tmp_path: Path, in_chans: int
) -> None:
    """The resize leaves such an image as decoded: Pillow's read-only buffer reached
    torch.from_numpy, and tune, evaluate and register printed NumPy's 'not writable'
    warning (with warnings as errors it even became an unreadable-image row)."""
    path = tmp_path / "at_size.png"
    Image.fromarray(_noise(SIZE, SIZE)).save(path)
    assert decode(path, in_chans).flags.writeable
    assert decode(path.read_bytes(), in_chans).flags.writeable
    dataset = ImageDataset([path], None, SIZE, in_chans)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        item = dataset[0]
    assert item["error"] == ""
    assert item["image"].shape == (SIZE, SIZE, in_chans)


def test_image_dataset_works_with_dataloader(tmp_path: Path) -> None:
    good = tmp_path / "ok.png"
    Image.fromarray(_noise()).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    dataset = ImageDataset([good, bad], [0, 1], SIZE, in_chans=3)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, SIZE, SIZE, 3)
    assert batch["label"].tolist() == [0, 1]
    assert batch["error"][0] == "" and batch["error"][1] != ""


def test_loader_workers_auto_keeps_cpu_cores_for_the_model(monkeypatch) -> None:
    from opensig.data.dataset import loader_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers("auto", torch.device("cuda")) == 8
    assert loader_workers("auto", torch.device("cuda"), world=4) == 3  # 16 cores / 4 processes
    assert loader_workers(2, torch.device("cpu")) == 2  # an explicit number is kept
