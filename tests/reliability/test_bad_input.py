"""Bad input, each as a real file: decoding, ingest's accounting, and predict's error rows."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from opensig.cli import app
from opensig.data.images import ImageRejected, check, decode
from opensig.data.scan import scan_folder
from opensig.data.split import _unit_interval
from opensig.labels import UNKNOWN_LABEL
from tests.reliability import messy

RED = np.array(messy.RED)


def _near(pixel: np.ndarray, colour, tol: int = 12) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(colour)) <= tol))


# --- decoding: every mode gives the picture a viewer shows --------------------------------


def test_cmyk_jpeg_decodes_to_its_rgb_colour(tmp_path: Path) -> None:
    pixels = decode(messy.cmyk_jpeg(tmp_path / "c.jpg"))
    assert pixels.shape == (16, 20, 3)
    assert _near(pixels[8, 10], RED, tol=20)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = messy.png16(tmp_path / "deep.png", value8=200)
    assert Image.open(path).mode.startswith("I;16")  # really 16-bit on disk
    pixels = decode(path, in_chans=1)
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 1)
    assert pixels[5, 5, 0] == 200  # Pillow's own convert("L") would clip it to 255


def test_palette_transparency_and_rgba_composite_on_white(tmp_path: Path) -> None:
    for path in (
        messy.palette_with_transparency(tmp_path / "p.png"),
        messy.rgba(tmp_path / "a.png"),
    ):
        pixels = decode(path)
        assert _near(pixels[4, 2], (255, 255, 255), tol=0), path.name  # transparent -> white
        assert _near(pixels[4, 12], RED, tol=0), path.name


def test_grayscale_gives_one_or_three_equal_channels(tmp_path: Path) -> None:
    path = messy.grayscale(tmp_path / "g.png")
    one, three = decode(path, in_chans=1), decode(path, in_chans=3)
    assert one.shape == (20, 24, 1) and three.shape == (20, 24, 3)
    assert np.array_equal(three[..., 0], one[..., 0]) and np.array_equal(three[..., 2], one[..., 0])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = messy.exif_rotated(tmp_path / "phone.jpg")
    pixels = decode(path, in_chans=1)
    assert pixels.shape == (40, 20, 1)  # upright: taller than wide
    assert pixels[:15].mean() > 200 and pixels[25:].mean() < 50  # white on top
    assert check(path.read_bytes()) == (20, 40)


def test_decompression_bomb_is_refused_without_decoding(tmp_path: Path) -> None:
    path = messy.png_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 200_000  # tiny on disk, 400 Mpx if decoded
    start = time.perf_counter()
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode(path)
    assert time.perf_counter() - start < 2  # header only: decoding would take far longer


def test_image_above_the_configured_limit_names_the_setting(tmp_path: Path) -> None:
    path = messy.large_jpeg(tmp_path / "big.jpg", size=(4000, 3000))
    with pytest.raises(ImageRejected, match=r"4000x3000 = 12 Mpx .*data\.max_image_pixels"):
        decode(path, max_pixels=10_000_000)


def test_very_large_valid_jpeg_decodes_at_reduced_scale(tmp_path: Path) -> None:
    path = messy.large_jpeg(tmp_path / "big.jpg")  # 8000 x 6000
    assert check(path.read_bytes()) == (8000, 6000)
    small = decode(path, in_chans=1, min_size=64)
    assert small.shape == (750, 1000, 1)  # 1/8 scale: both sides still >= 64
    assert small[:, 0].mean() < small[:, -1].mean()  # the gradient survives


def test_truncated_large_jpeg_is_caught_even_at_reduced_scale(tmp_path: Path) -> None:
    data = messy.large_jpeg(tmp_path / "big.jpg", size=(2000, 1600)).read_bytes()
    with pytest.raises(OSError, match="truncated"):
        check(data[: len(data) // 2])


# --- ingest: every file kept or reported, with its reason ---------------------------------


def _messy_tree(root: Path) -> dict[str, str]:
    """Bad and awkward files under ``root``; returns {file name: expected skip reason part}."""
    known, unknown = root / "known", root / "unknown"
    messy.truncated_jpeg(known / "0" / "truncated.jpg")
    messy.write(known / "0" / "zero.png", b"")
    messy.text_as_jpeg(known / "1" / "notes.jpg")
    messy.svg(known / "1" / "drawing.svg")
    messy.png_bomb(unknown / "street" / "bomb.png")
    messy.non_utf8_name(known / "2")
    os.symlink("../../nowhere.png", known / "2" / "dangling.png")
    os.symlink("..", known / "3" / "loop")  # known/3/loop -> known/: a folder cycle
    messy.write(root / "README.txt", b"notes about the data\n")
    messy.write(known / "4" / ".DS_Store", b"\0\0\0\1Bud1")
    return {
        "truncated.jpg": "truncated",
        "zero.png": "empty file",
        "notes.jpg": "not an image",
        "drawing.svg": "not an image",
        "bomb.png": "decompression bomb",
        "caf\\xe9.png": "not valid UTF-8",
        "dangling.png": "broken symlink",
        "loop": "symlink loop",
        "README.txt": "not under known/ or unknown/",
        ".DS_Store": "hidden file",
    }


def _awkward_but_good(root: Path) -> list[Path]:
    """Files that must be kept: odd modes, rotation, names, a link, a large photo."""
    known = root / "known"
    return [
        messy.cmyk_jpeg(known / "0" / "cmyk.jpg"),
        messy.png16(known / "0" / "sixteen bit.png"),
        messy.palette_with_transparency(known / "1" / "palette.png"),
        messy.rgba(known / "1" / "alpha.png"),
        messy.grayscale(known / "2" / "grey.png"),
        messy.exif_rotated(known / "2" / "phone.jpg"),
        messy.save(known / "3" / "café noir 日本.png", Image.fromarray(messy.noise(11)), "PNG"),
        messy.large_jpeg(known / "4" / "large.jpg"),
    ]


def _entries(root: Path) -> int:
    """Count what a user would count: every file and link in the tree, without following."""
    return sum(
        len(files) + sum(os.path.islink(os.path.join(top, d)) for d in dirs)
        for top, dirs, files in os.walk(root)
    )


def test_scan_keeps_the_good_and_reports_every_bad_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for k in range(5):
        messy.save(root / "known" / str(k) / "ok.png", Image.fromarray(messy.noise(k)), "PNG")
    expected = _messy_tree(root)
    good = _awkward_but_good(root)
    link = root / "known" / "4" / "z_link.png"
    os.symlink(good[-1], link)  # a link to a file is followed: the same bytes, a duplicate

    result = scan_folder(root)
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert set(reasons) == set(expected)
    for name, part in expected.items():
        assert part in reasons[name], (name, reasons[name])
    kept = set(result.records["path"])
    assert {p.as_posix() for p in good} <= kept
    assert [d["path"] for d in result.duplicates] == [link.as_posix()]
    phone = result.records[result.records["path"].str.endswith("phone.jpg")].iloc[0]
    assert (phone.width, phone.height) == (20, 40)  # upright size
    counts = result.counts()
    assert counts["found"] == _entries(root)
    assert counts["found"] == sum(v for k, v in counts.items() if k != "found")


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_ingest_report_accounts_for_every_file(project: Path, caplog) -> None:
    expected = _messy_tree(project / "data")
    good = _awkward_but_good(project / "data")
    same = project / "data" / "known" / "5" / "digit_twin.png"
    shutil.copy(next((project / "data" / "unknown" / "6").iterdir()), same)  # label conflict
    n_files = _entries(project / "data")

    with caplog.at_level(logging.INFO):
        _run("ingest")
    report = json.loads(Path("reports/ingest.json").read_text())
    files = report["files"]
    assert files["found"] == n_files
    assert files["kept"] + files["skipped"] + files["duplicates"] + files["conflicts"] == n_files
    assert files["kept"] == report["images"] == len(pd.read_parquet("artifacts/manifest.parquet"))
    assert files["conflicts"] == 2  # both copies of the twin leave the data
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(expected)
    manifest = set(pd.read_parquet("artifacts/manifest.parquet")["path"])
    assert {p.as_posix() for p in good} <= {str(project / p) for p in manifest}
    summary = [r.message for r in caplog.records if r.message.startswith("ingest: ")]
    assert summary and f"{n_files} found" in summary[0] and "reports/ingest.json" in summary[0]


def test_empty_class_folder_is_a_clear_error(project: Path, caplog) -> None:
    (project / "data" / "known" / "empty_class").mkdir()
    result = CliRunner().invoke(app, ["ingest"])
    assert result.exit_code == 2
    assert "no usable images: data/known/empty_class; add readable images" in caplog.text
    assert not Path("artifacts/manifest.parquet").exists()


@pytest.mark.parametrize("name", ["unknown", "Unknown", "UNKNOWN", "_unknown"])
def test_class_folder_named_like_unknown_is_refused(tmp_path: Path, name: str) -> None:
    messy.save(tmp_path / "known" / "cat" / "a.png", Image.fromarray(messy.noise(1)), "PNG")
    messy.save(tmp_path / "known" / name / "b.png", Image.fromarray(messy.noise(2)), "PNG")
    with pytest.raises(ValueError, match=rf"known/{name} is not allowed.*reserved"):
        scan_folder(tmp_path)


def test_same_image_under_two_classes_or_class_and_unknown_is_excluded(tmp_path: Path) -> None:
    twin = Image.fromarray(messy.noise(7))
    for folder in ("known/cat", "known/dog", "unknown/street"):
        messy.save(tmp_path / folder / "twin.png", twin, "PNG")
    messy.save(tmp_path / "known/cat/c.png", Image.fromarray(messy.noise(8)), "PNG")
    messy.save(tmp_path / "known/dog/d.png", Image.fromarray(messy.noise(9)), "PNG")
    result = scan_folder(tmp_path)
    assert [c["labels"] for c in result.conflicts] == [["cat", "dog", UNKNOWN_LABEL]]
    assert not result.records["path"].str.endswith("twin.png").any()


def test_class_too_small_for_a_train_image_is_a_clear_error(project: Path, caplog) -> None:
    # a class of one image whose content hash sends it to test: the model could never learn it
    seed = next(s for s in range(1000) if _unit_interval(_hash(_png_bytes(s)), 0) < 0.15)
    messy.write(project / "data" / "known" / "rare" / "only.png", _png_bytes(seed))
    result = CliRunner().invoke(app, ["ingest"])
    assert result.exit_code == 2
    assert "'rare' (1 image(s), none in train)" in caplog.text
    assert not Path("artifacts/manifest.parquet").exists()


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(messy.noise(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
