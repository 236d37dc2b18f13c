"""Writers of the messy files real image folders hold, each a real file of its kind."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (220, 30, 30)


def noise(seed: int, size: tuple[int, int] = (24, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def save(path: Path, image: Image.Image, fmt: str, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)
    return path


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def truncated_jpeg(path: Path, seed: int = 0) -> Path:
    data = jpeg_bytes(Image.fromarray(noise(seed, (64, 48))), quality=90)
    return write(path, data[: len(data) // 2])


def text_as_jpeg(path: Path) -> Path:
    return write(path, b"Meeting notes, not a picture.\n")


def svg(path: Path) -> Path:
    """An image format Pillow does not read (vector graphics)."""
    return write(
        path, b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect/></svg>\n'
    )


def cmyk_jpeg(path: Path) -> Path:
    return save(path, Image.new("RGB", (20, 16), RED).convert("CMYK"), "JPEG", quality=95)


def png16(path: Path, value8: int = 200) -> Path:
    """A 16-bit greyscale PNG whose every pixel is ``value8`` on the 8-bit scale."""
    pixels = np.full((16, 16), value8 * 257, dtype=np.uint16)
    pixels[0, 0] = 0  # not constant, like a real photo
    return save(path, Image.fromarray(pixels), "PNG")


def palette_with_transparency(path: Path) -> Path:
    """Palette PNG: left half transparent (index 0), right half red (index 1)."""
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    img.paste(1, (8, 0, 16, 16))
    return save(path, img, "PNG", transparency=0)


def rgba(path: Path) -> Path:
    """Left half fully transparent black, right half opaque red."""
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[:, 8:] = (*RED, 255)
    return save(path, Image.fromarray(pixels, mode="RGBA"), "PNG")


def grayscale(path: Path, seed: int = 3) -> Path:
    return save(path, Image.fromarray(noise(seed)[..., 0]), "PNG")


def exif_rotated(path: Path) -> Path:
    """Stored 40x20 with a white left half; EXIF orientation 6 shows it 20x40, white on top."""
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return save(path, Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def png_bomb(path: Path, side: int = 20_000) -> Path:
    """A valid PNG of side x side black 1-bit pixels: a few kB on disk, 400 Mpx decoded."""
    row = b"\0" + b"\0" * ((side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    return write(path, png)


def large_jpeg(path: Path, size: tuple[int, int] = (8000, 6000)) -> Path:
    """A real, valid 48 Mpx photo-sized JPEG (a gradient, so it compresses to a small file)."""
    ramp = np.linspace(0, 255, size[0], dtype=np.uint8)
    img = Image.fromarray(np.broadcast_to(ramp, (size[1], size[0])).copy())
    return save(path, img, "JPEG", quality=80)


def non_utf8_name(folder: Path, seed: int = 4) -> Path:
    """A valid PNG whose file name has a byte that is not UTF-8 (Latin-1 'é')."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    Image.fromarray(noise(seed)).save(raw.decode("utf-8", "surrogateescape"), format="PNG")
    return Path(raw.decode("utf-8", "surrogateescape"))
