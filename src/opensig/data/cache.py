"""Decode once: every training image, resized to the model's input, in one uint8 array.

Decoding and resizing image files again every epoch is work the model never needed: it
is the same every time. The first run of a (data, image size, channels) combination
decodes all images on every core into ``<cache>/<key>.npy``; later epochs, and later runs
on the same data (e.g. a new learning rate), read that array, memory-mapped so 100k large
images need disk rather than RAM. The key hashes the images' content hashes, so new data
gets a new file and a stale one is never read.

The cached pixels are exactly what ``ImageDataset`` computes from the file (the same
``fit_to``), so training and validation on cached and on file inputs are identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from opensig.data.dataset import fit_to
from opensig.data.images import DECODE_VERSION, MAX_IMAGE_PIXELS, decode
from opensig.io import atomic_write
from opensig.progress import image_bar

log = logging.getLogger(__name__)


def cache_key(hashes: Sequence[str], size: int, in_chans: int) -> str:
    digest = hashlib.sha256("\n".join(hashes).encode())
    digest.update(f"{size}x{in_chans}:decode-v{DECODE_VERSION}".encode())
    return digest.hexdigest()[:24]


def _decode(args: tuple[str, int, int, int | None]) -> np.ndarray | str:
    path, size, in_chans, max_pixels = args
    try:
        return fit_to(decode(path, in_chans, max_pixels, size), size)
    except Exception as err:  # reported with the file name by the caller
        return f"{type(err).__name__}: {err}"


def decode_all(
    paths: Sequence[str],
    size: int,
    in_chans: int,
    workers: int | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """(N, size, size, C) uint8 decoded on every core; an unreadable file is an error.

    Threads suffice: Pillow's decoders and OpenCV's resize release the GIL.
    """
    out = np.empty((len(paths), size, size, in_chans), dtype=np.uint8)
    jobs = [(str(p), size, in_chans, max_pixels) for p in paths]
    pool = ThreadPoolExecutor(workers or os.cpu_count() or 1)
    with pool, image_bar(len(jobs), "decoding") as bar:
        for i, image in enumerate(pool.map(_decode, jobs)):
            if isinstance(image, str):
                raise RuntimeError(f"{paths[i]}: {image}; the data changed since ingest: rerun it")
            out[i] = image.reshape(size, size, in_chans)
            bar.update()
    return out


def _save(path: Path, images: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, images)


def cached_images(
    paths: Sequence[str],
    hashes: Sequence[str],
    size: int,
    in_chans: int,
    cache_dir: Path,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """The decoded images, from ``cache_dir`` when this exact set was decoded before."""
    path = Path(cache_dir) / f"{cache_key(hashes, size, in_chans)}.npy"
    if path.is_file():
        images = np.load(path, mmap_mode="r")
        if images.shape == (len(paths), size, size, in_chans):
            log.info("decoded images: reusing %s", path)
            return images
    images = decode_all(paths, size, in_chans, max_pixels=max_pixels)
    atomic_write(path, lambda tmp: _save(tmp, images))
    log.info("decoded %d images once into %s (%.1f MB)", len(paths), path, images.nbytes / 1e6)
    return np.load(path, mmap_mode="r")
