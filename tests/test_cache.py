"""The decode-once cache: the same pixels as decoding the files, reused only for the same data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opensig.data.cache import cache_key, cached_images, decode_all
from opensig.data.dataset import ImageDataset


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        size = (20 + i, 30 - i)  # different sizes and aspect ratios
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


@pytest.mark.parametrize("in_chans", [1, 3])
def test_cached_pixels_score_exactly_like_the_files(tmp_path: Path, in_chans: int) -> None:
    paths = _images(tmp_path / "img", 5)
    decoded = decode_all(paths, 16, in_chans, workers=2)
    assert decoded.shape == (5, 16, 16, in_chans) and decoded.dtype == np.uint8
    from_files = ImageDataset(paths, None, 16, in_chans)
    from_cache = ImageDataset(paths, None, 16, in_chans, decoded)
    for i in range(5):
        assert np.array_equal(from_files[i]["image"].numpy(), from_cache[i]["image"].numpy())


def test_cache_is_reused_for_the_same_data_only(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img", 4)
    hashes = [f"h{i}" for i in range(4)]
    first = cached_images(paths, hashes, 16, 1, tmp_path / "cache")
    (written,) = (tmp_path / "cache").glob("*.npy")
    assert written.name == f"{cache_key(hashes, 16, 1)}.npy"
    mtime = written.stat().st_mtime_ns
    again = cached_images(paths, hashes, 16, 1, tmp_path / "cache")
    assert written.stat().st_mtime_ns == mtime and np.array_equal(first, again)
    # New data, another size or channel count: another key, another file.
    assert (
        len(
            {
                cache_key(hashes, 16, 1),
                cache_key(hashes[:3], 16, 1),
                cache_key(hashes, 32, 1),
                cache_key(hashes, 16, 3),
            }
        )
        == 4
    )


def test_unreadable_file_names_itself(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img", 2)
    Path(paths[1]).write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match=r"1\.png: .*rerun"):
        decode_all(paths, 16, 3)
