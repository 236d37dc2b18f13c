"""Torch dataset over image files, and THE preprocessing every model input goes through.

Training, evaluation, tuning, predict and the MLflow pyfunc all feed images through
``fit_to(image, spec.image_size)`` (per image, in the loader) then ``model_input(batch,
spec)``, so a model is never scored on inputs prepared differently from the ones it was
validated on. Per image the pixels stay uint8 at the model's size; the float conversion,
the training augmentation (``opensig.data.augment``) and the normalisation run once per
batch, on the GPU when there is one: cheaper than per image, and a quarter of the bytes to
copy to the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache
from typing import Protocol

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call at import time

import albumentations as A
import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

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


@cache
def _resizer(size: int) -> A.Resize:
    return A.Resize(size, size)


def fit_to(image: np.ndarray, size: int) -> np.ndarray:
    """An HxWxC uint8 image resized to the model's square input (returned as it is when it
    is that size already: the decode cache holds images resized by this very call)."""
    if image.shape[:2] == (size, size):
        return image
    return _resizer(size)(image=image)["image"]


def model_input(
    images: torch.Tensor,
    spec: ModelSpec,
    device: torch.device,
    channels_last: bool = True,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A uint8 NHWC batch -> the model's normalised float NCHW input on ``device``;
    ``augment`` (training) transforms the float batch, pixel values 0-255, before the
    normalisation.

    The permuted tensor is channels-last already, the layout convolutions run fastest in.
    """
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if augment is not None:
        x = augment(x)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1) * 255.0
    x = (x - mean) / std
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=layout)


class DecodedRows(Protocol):
    """Pixels decoded ahead of time (``opensig.data.cache.Decoded``): row ``index``'s, or
    None where they were not (the file is decoded then)."""

    def get(self, index: int) -> np.ndarray | None: ...


class ImageDataset(Dataset):
    """Images at the model's size (``fit_to``) with labels: a class index (-1 for unknown),
    or a multi-hot row (all-zero for unknown) for multi-label data.

    A file that cannot be read yields a zero image and its error text instead of raising,
    so one bad file in a folder of thousands costs one row in predict, not the whole run.
    ``decoded`` (from ``opensig.data.cache``) replaces decoding the files, row for row,
    where it holds a row.
    ``max_pixels`` is passed to :func:`opensig.data.images.decode`, with ``size`` as the
    smallest side a JPEG may be decoded at.
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        labels: Sequence[int] | None,
        size: int,
        in_chans: int,
        decoded: DecodedRows | None = None,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        self.sources = list(sources)
        self.labels = list(labels) if labels is not None else [-1] * len(self.sources)
        self.size = size
        self.in_chans = in_chans
        self.decoded = decoded
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        label = torch.as_tensor(self.labels[index])  # a class index, or a multi-hot row
        try:
            pixels = self.decoded.get(index) if self.decoded is not None else None
            if pixels is None:
                pixels = decode(self.sources[index], self.in_chans, self.max_pixels, self.size)
            image = torch.from_numpy(np.ascontiguousarray(fit_to(pixels, self.size)))
            error = ""
        except UnidentifiedImageError:  # its message names a BytesIO object for raw bytes
            image = self._blank_image()
            error = "UnidentifiedImageError: not an image, or a format Pillow cannot read"
        except Exception as err:
            image, error = self._blank_image(), f"{type(err).__name__}: {err}"
        image = image.view(self.size, self.size, self.in_chans)  # OpenCV drops a single channel
        return {"image": image, "label": label, "error": error}

    def _blank_image(self) -> torch.Tensor:
        return torch.zeros((self.size, self.size, self.in_chans), dtype=torch.uint8)
