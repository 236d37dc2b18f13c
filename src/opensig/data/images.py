"""Decoding an image file: the one definition every stage, predict and the pyfunc share.

Real folders hold more than clean 8-bit RGB JPEGs. Phones store the orientation in EXIF
instead of rotating the pixels; PNGs come as palette, grey+alpha or 16-bit; print workflows
leave CMYK JPEGs; and a tiny file can claim a 50000x50000 canvas (a decompression bomb).
Each case is handled here, once, so an image is decoded the same way when ingest checks it,
when the model trains on it and when it is predicted:

- the size is checked from the header, before any pixel is decoded;
- EXIF orientation is applied (what the user sees in a viewer is what the model sees);
- transparent pixels are composited onto white (the usual backdrop of cut-out images);
- 16-bit and float images are scaled to 8 bits, not clipped (Pillow's ``convert`` clips);
- large JPEGs decode at a reduced scale (DCT scaling) when the caller needs a small image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

ImageSource = str | Path | bytes

# Pillow's own bomb limit is 89.5 Mpx (a warning) and twice that (an error, which no
# setting here lifts); 100 Mpx is above common camera output and bounds one decoded RGB
# image to 300 MB.
MAX_IMAGE_PIXELS = 100_000_000
DECODE_VERSION = "2"  # bump when decoding changes, so cached pixels and probes are redone
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_TURNS = {2, 3, 4, 5, 6, 7, 8}  # EXIF orientations other than upright (1)
_QUARTER_TURNS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_CHECK_SIZE = 64  # smallest side check() decodes JPEGs at


class ImageRejected(ValueError):
    """An image opensig refuses to decode (too large); the message says why and what to do."""


def _check_size(img: Image.Image, max_pixels: int | None) -> None:
    width, height = img.size
    if width == 0 or height == 0:
        raise ImageRejected(f"image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageRejected(
            f"{width}x{height} = {width * height / 1e6:.0f} Mpx is above the limit of "
            f"{max_pixels / 1e6:.0f} Mpx (data.max_image_pixels): refused as a possible "
            "decompression bomb; downscale the image or raise the limit"
        )


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> 8-bit, scaled by the range the values use."""
    values = np.asarray(img, dtype=np.float64)
    top = float(values.max(initial=0.0))
    if img.mode == "F" and top <= 1.0:
        scale = 255.0
    elif top <= 255.0:
        scale = 1.0
    elif top <= 65535.0:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / top
    return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), mode="L")


def _flatten(img: Image.Image, in_chans: int) -> Image.Image:
    if img.mode in _WIDE_MODES:
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    mode = "L" if in_chans == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)  # the same mode: convert copies


def _decode(
    source: ImageSource, in_chans: int, max_pixels: int | None, min_size: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels, and the upright full-resolution (width, height) from the header."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        # the size check below replaces Pillow's bomb warning with a clear error
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(handle)
        except Image.DecompressionBombError as err:  # above Pillow's own hard limit
            raise ImageRejected(f"refused as a possible decompression bomb ({err})") from None
        with opened as img:
            _check_size(img, max_pixels)
            width, height = img.size
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation in _QUARTER_TURNS:
                width, height = height, width
            if min_size:
                img.draft(img.mode, (min_size, min_size))
            # exif_transpose of an upright image is a copy and a second EXIF read: skipped
            upright = ImageOps.exif_transpose(img) if orientation in _TURNS else img
            array = np.asarray(_flatten(upright, in_chans))
    return (array[..., None] if array.ndim == 2 else array), (width, height)


def decode(
    source: ImageSource,
    in_chans: int = 3,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    min_size: int | None = None,
) -> np.ndarray:
    """A file path or raw bytes -> HxWxC uint8 (RGB, or L for ``in_chans`` 1), upright.

    ``min_size``: the caller will resize to about this many pixels a side, so a JPEG may
    decode at 1/2, 1/4 or 1/8 scale as long as both sides stay at least that large.
    Raises :class:`ImageRejected` for a refused image, Pillow's errors for a broken one.
    The array is the caller's own, writable: Pillow's pixel buffer is read-only, and an
    image already at the model's size passes the resize untouched into ``torch.from_numpy``.
    """
    return np.array(_decode(source, in_chans, max_pixels, min_size)[0])


def check(source: ImageSource, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Decode fully (at most 1/8 JPEG scale, which still reads every byte) to prove the file
    usable; return its upright (width, height). Raises like :func:`decode`."""
    return _decode(source, 3, max_pixels, _CHECK_SIZE)[1]
