"""Torch dataset over image files, and THE preprocessing (train and eval transforms).

Evaluation, tuning, predict and the MLflow pyfunc all feed images through
``eval_transform(spec)`` then ``model_input(batch, spec)``, so a model is never scored on
inputs prepared differently from the ones it was validated on. Per image the transforms
stay in uint8 (resize, crops, colour); the float conversion and normalisation run once per
batch, on the GPU when there is one: cheaper than per image, and a quarter of the bytes
to copy to the device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call at import time

import albumentations as A
import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from opensig.config import AugmentConfig
from opensig.data.images import MAX_IMAGE_PIXELS, ImageSource, decode
from opensig.model import ModelSpec


def loader_workers(setting: int | str, device: torch.device, world: int = 1) -> int:
    """DataLoader processes for ``auto``: none on CPU (they would take the cores the model
    computes on), else up to 8 per process, leaving one core per process for the loop."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // world - 1))


def eval_transform(spec: ModelSpec) -> A.Compose:
    """Resize to the model's square input (uint8 HxWxC; ``model_input`` normalises)."""
    size = spec.image_size
    return A.Compose([A.Resize(size, size)])


def model_input(
    images: torch.Tensor, spec: ModelSpec, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """A uint8 NHWC batch -> the model's normalised float NCHW input on ``device``.

    The permuted tensor is channels-last already, the layout convolutions run fastest in.
    """
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1) * 255.0
    x = (x - mean) / std
    return x if channels_last else x.contiguous()


def train_transform(spec: ModelSpec, augment: AugmentConfig, seed: int | None = None) -> A.Compose:
    """Mild geometric and photometric augmentation; flips only when the classes allow it."""
    size = spec.image_size
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(size, size), scale=(augment.scale_min, 1.0), ratio=(0.9, 1.1)),
        A.Affine(rotate=(-augment.rotate, augment.rotate), p=0.5 if augment.rotate else 0.0),
    ]
    if augment.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if augment.brightness_contrast:
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=augment.brightness_contrast,
                contrast_limit=augment.brightness_contrast,
                p=0.5,
            )
        )
    return A.Compose(steps, seed=seed)


class ImageDataset(Dataset):
    """Images with labels: a class index (-1 for unknown), or a multi-hot row (all-zero for
    unknown) for multi-label data.

    A file that cannot be read yields a zero image and its error text instead of raising,
    so one bad file in a folder of thousands costs one row in predict, not the whole run.
    ``decoded`` (from ``opensig.data.cache``) replaces decoding the files, row for row.
    ``min_size`` and ``max_pixels`` are passed to :func:`opensig.data.images.decode`.
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        labels: Sequence[int] | None,
        transform: A.Compose,
        in_chans: int,
        decoded: np.ndarray | None = None,
        min_size: int | None = None,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        self.sources = list(sources)
        self.labels = list(labels) if labels is not None else [-1] * len(self.sources)
        self.transform = transform
        self.in_chans = in_chans
        self.decoded = decoded
        self.min_size = min_size
        self.max_pixels = max_pixels
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        label = torch.as_tensor(self.labels[index])  # a class index, or a multi-hot row
        try:
            pixels = (
                np.array(self.decoded[index])  # a writable copy of the read-only map
                if self.decoded is not None
                else decode(self.sources[index], self.in_chans, self.max_pixels, self.min_size)
            )
            image = torch.from_numpy(np.ascontiguousarray(self.transform(image=pixels)["image"]))
            error = ""
        except UnidentifiedImageError:  # its message names a BytesIO object for raw bytes
            image = self._blank_image()
            error = "UnidentifiedImageError: not an image, or a format Pillow cannot read"
        except Exception as err:
            image, error = self._blank_image(), f"{type(err).__name__}: {err}"
        image = image.view(*image.shape[:2], self.in_chans)  # OpenCV drops a single channel
        return {"image": image, "label": label, "error": error}

    def _blank_image(self) -> torch.Tensor:
        if self._blank is None:
            blank = np.zeros((8, 8, self.in_chans), dtype=np.uint8)
            self._blank = torch.from_numpy(np.zeros_like(self.transform(image=blank)["image"]))
        return self._blank
