"""Batched augmentation: each transform's draws against its definition, and its pixels."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as tvf

from opensig.config import AugmentConfig
from opensig.data.augment import TRIVIAL_OPS, BatchAugment, trivial_augment

N = 4000  # draws per check: a probability of 1/2 lands in [0.45, 0.55] (6 sigma)


def _params(augment: AugmentConfig, seed: int = 0) -> tuple[torch.Tensor, ...]:
    theta, contrast, brightness = BatchAugment(**augment.model_dump(), seed=seed).params(N, 16, 16)
    return theta.double(), contrast.double(), brightness.double()


def _crop(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each map's crop width and height (fractions of the side) and its rotation (radians):
    its 2x2 part is diag(width, height) @ rotation @ diag(+-1, 1)."""
    width = torch.hypot(theta[:, 0, 0], theta[:, 0, 1])
    height = torch.hypot(theta[:, 1, 0], theta[:, 1, 1])
    angle = torch.atan2(-theta[:, 0, 1] / width, theta[:, 1, 1] / height)
    return width, height, angle


def test_the_crop_covers_the_asked_area_and_ratio_inside_the_image() -> None:
    theta, _, _ = _params(AugmentConfig(scale_min=0.5, rotate=0.0, brightness_contrast=0.0))
    width, height, angle = _crop(theta)
    area, ratio = width * height, width / height
    assert area.min() >= 0.5 - 1e-6 and area.max() <= 1.0 + 1e-6
    assert area.min() < 0.52 and area.max() > 0.98  # the whole range is drawn
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert torch.all(angle.abs() < 1e-9)
    # every corner of the crop lies inside the image ([-1, 1] on both axes)
    assert torch.all(theta[:, 0, 2].abs() + width <= 1.0 + 1e-6)
    assert torch.all(theta[:, 1, 2].abs() + height <= 1.0 + 1e-6)


def test_rotation_flip_and_photometry_each_apply_to_about_half_within_their_limits() -> None:
    augment = AugmentConfig(rotate=10.0, hflip=True, brightness_contrast=0.2)
    theta, contrast, brightness = _params(augment)
    _, _, angle = _crop(theta)
    rotated = angle.abs() > 1e-9
    assert 0.45 < rotated.double().mean() < 0.55
    assert angle.abs().max() <= math.radians(10.0) + 1e-6
    flipped = torch.linalg.det(theta[:, :, :2]) < 0
    assert 0.45 < flipped.double().mean() < 0.55
    changed = (contrast != 1.0) | (brightness != 0.0)
    assert 0.45 < changed.double().mean() < 0.55
    assert torch.all((contrast - 1.0).abs() <= 0.2 + 1e-6)
    assert torch.all(brightness.abs() <= 0.2 + 1e-6)
    assert torch.all(brightness[~changed] == 0.0)


def test_switched_off_transforms_draw_nothing() -> None:
    theta, contrast, brightness = _params(AugmentConfig(hflip=False, brightness_contrast=0.0))
    assert torch.all(torch.linalg.det(theta[:, :, :2]) > 0)
    assert torch.all(contrast == 1.0) and torch.all(brightness == 0.0)


def test_the_same_seed_gives_the_same_batch_and_each_call_new_draws() -> None:
    images = torch.rand(8, 3, 16, 16) * 255
    config = AugmentConfig(rotate=30.0, hflip=True, brightness_contrast=0.3)
    augment = BatchAugment(**config.model_dump(), seed=7)
    first, second = augment(images), augment(images)
    assert first.shape == images.shape and first.dtype == torch.float32
    assert not torch.equal(first, second)
    augment.seed(7)
    assert torch.equal(augment(images), first)
    augment.seed(8)
    assert not torch.equal(augment(images), first)


def test_pixels_a_constant_image_keeps_its_value_up_to_brightness_and_contrast() -> None:
    """A crop inside the image samples no border: only the photometric change remains."""
    config = AugmentConfig(rotate=0.0, brightness_contrast=0.3)
    augment = BatchAugment(**config.model_dump(), seed=3)
    images = torch.full((64, 1, 16, 16), 100.0)
    out = augment(images)
    augment.seed(3)
    _, contrast, brightness = augment.params(64, 16, 16)
    expected = (100.0 * contrast + 255.0 * brightness).clamp(0, 255).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected.expand_as(out), atol=1e-3, rtol=0)


def test_pixels_rotated_corners_are_black_and_flips_mirror() -> None:
    """Left half dark, right half bright: a flipped image has its bright half on the left."""
    config = AugmentConfig(rotate=0.0, hflip=True, brightness_contrast=0.0)
    augment = BatchAugment(**config.model_dump(), seed=5)
    images = torch.zeros(64, 1, 16, 16)
    images[..., 8:] = 255.0
    out = augment(images)
    augment.seed(5)
    theta, _, _ = augment.params(64, 16, 16)
    flipped = torch.linalg.det(theta[:, :, :2]) < 0
    left, right = out[..., :8].mean(dim=(1, 2, 3)), out[..., 8:].mean(dim=(1, 2, 3))
    assert 0 < int(flipped.sum()) < 64
    assert torch.equal(left > right, flipped)

    config = AugmentConfig(scale_min=1.0, rotate=45.0, brightness_contrast=0.0)
    out = BatchAugment(**config.model_dump(), seed=0)(torch.full((64, 1, 16, 16), 200.0))
    theta, _, _ = BatchAugment(**config.model_dump(), seed=0).params(64, 16, 16)
    rotated = _crop(theta.double())[2].abs() > math.radians(20)
    assert rotated.any()
    assert torch.all(out[rotated][..., 0, 0] < 100.0)  # a corner from outside the image
    assert torch.all(out[..., 8, 8] > 199.0)  # the centre stays inside


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_draws_do_not_depend_on_the_device() -> None:
    images = torch.rand(8, 3, 16, 16) * 255
    config = AugmentConfig(rotate=30.0, hflip=True, brightness_contrast=0.3)
    on_cpu = BatchAugment(**config.model_dump(), seed=1)(images)
    on_gpu = BatchAugment(**config.model_dump(), seed=1)(images.cuda()).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-2, rtol=0)


def test_erasing_covers_the_asked_share_of_images_area_and_ratio() -> None:
    augment = BatchAugment(**AugmentConfig(erase=0.25).model_dump(), seed=5)
    mask = augment.erase_mask(N, 64, 64)
    erased = mask.any(dim=(1, 2))
    assert 0.22 < erased.double().mean() < 0.28
    rows, cols = mask[erased].any(dim=2), mask[erased].any(dim=1)
    h, w = rows.sum(dim=1).double(), cols.sum(dim=1).double()
    area = mask[erased].sum(dim=(1, 2)).double()
    assert torch.equal(area, h * w)  # one rectangle each
    share = area / 64**2
    assert share.min() >= 0.015 and share.max() <= 0.36  # U(0.02, 1/3), rounded to pixels
    assert 0.15 < share.mean() < 0.2  # the mean of U(0.02, 1/3) is 0.177
    assert (w / h).min() > 0.25 and (w / h).max() < 4.0  # log-uniform in [0.3, 3.3]


def test_erasing_replaces_pixels_by_noise_and_off_changes_nothing() -> None:
    images = torch.full((64, 1, 16, 16), 100.0)
    config = AugmentConfig(rotate=0.0, brightness_contrast=0.0, scale_min=1.0)
    plain = BatchAugment(**config.model_dump(), seed=3)(images)
    torch.testing.assert_close(plain, images)  # erase 0: as before, no draw made
    erasing = BatchAugment(**config.model_copy(update={"erase": 1.0}).model_dump(), seed=3)
    out = erasing(images)
    erasing.seed(3)
    erasing.params(64, 16, 16)  # the same draws in the same order as the call
    mask = erasing.erase_mask(64, 16, 16).unsqueeze(1)
    assert mask.any(dim=(1, 2, 3)).all()  # probability 1: every image
    torch.testing.assert_close(out[~mask], images[~mask])
    assert (out[mask] != 100.0).float().mean() > 0.99 and out[mask].std() > 50  # noise


def _trivial_config(**update: object) -> AugmentConfig:
    plain = AugmentConfig(rotate=0.0, brightness_contrast=0.0, scale_min=1.0)
    return plain.model_copy(update={"trivial": True, **update})


def test_trivial_augment_draws_every_op_and_magnitude_within_its_range() -> None:
    augment = BatchAugment(**_trivial_config().model_dump(), seed=0)
    op, magnitude = augment.trivial_params(N * 4)
    counts = torch.bincount(op, minlength=len(TRIVIAL_OPS)).double() / op.numel()
    assert counts.min() > 0.8 / len(TRIVIAL_OPS) and counts.max() < 1.2 / len(TRIVIAL_OPS)
    limits = {"shear_x": 0.99, "rotate": 135.0, "translate_y": 1 / 7, "contrast": 0.99}
    for name, top in limits.items():
        drawn = magnitude[op == TRIVIAL_OPS.index(name)].double()
        assert drawn.abs().max() == pytest.approx(top, rel=1e-6)  # the top bin is reached
        assert 0.4 < (drawn > 0).double().mean() < 0.6  # signed: either way
        assert len(torch.unique(drawn.abs())) == 31  # 31 bins
    bits = magnitude[op == TRIVIAL_OPS.index("posterize")]
    assert set(bits.tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}
    threshold = magnitude[op == TRIVIAL_OPS.index("solarize")]
    assert threshold.min() == 0.0 and threshold.max() == 255.0


@pytest.mark.parametrize(
    ("name", "magnitude", "reference"),
    [
        ("brightness", 0.5, lambda x: tvf.adjust_brightness(x, 1.5)),
        ("brightness", -0.7, lambda x: tvf.adjust_brightness(x, 0.3)),
        ("color", 0.8, lambda x: tvf.adjust_saturation(x, 1.8)),
        ("contrast", -0.6, lambda x: tvf.adjust_contrast(x, 0.4)),
        ("sharpness", 0.9, lambda x: tvf.adjust_sharpness(x, 1.9)),
        ("posterize", 3.0, lambda x: tvf.posterize(x, 3)),
        ("solarize", 100.0, lambda x: tvf.solarize(x, 100)),
        ("autocontrast", 0.0, tvf.autocontrast),
        ("equalize", 0.0, tvf.equalize),
    ],
)
def test_trivial_photometric_ops_match_torchvision(name, magnitude, reference) -> None:
    """Each image of the batch against torchvision on that image alone: within 1.5 grey
    levels, since torchvision truncates its uint8 results (and a grey image's mean)."""
    generator = torch.Generator().manual_seed(1)
    pixels = (torch.rand(5, 3, 12, 12, generator=generator) * 180 + 30).round().to(torch.uint8)
    op = torch.full((5,), TRIVIAL_OPS.index(name))
    out = trivial_augment(pixels.float(), op, torch.full((5,), magnitude))
    for image, got in zip(pixels, out, strict=True):
        expected = reference(image.unsqueeze(0)).float()[0]
        assert (got - expected).abs().max() <= 1.5, name


def test_trivial_geometric_ops_move_content_as_asked() -> None:
    image = torch.zeros(1, 1, 21, 21)
    image[0, 0, 10, 10] = 255.0  # one bright pixel in the centre
    image[0, 0, 10, 14] = 255.0  # and one 4 px right of it
    ops = ["identity", "translate_x", "translate_y", "rotate", "shear_y"]
    batch = image.repeat(len(ops), 1, 1, 1)
    op = torch.tensor([TRIVIAL_OPS.index(name) for name in ops])
    out = trivial_augment(batch, op, torch.tensor([0.0, 3 / 21, 3 / 21, 90.0, 0.5]))

    def brightest(index: int) -> set[tuple[int, int]]:
        spots = (out[index, 0] > 200).nonzero().tolist()
        return {tuple(spot) for spot in spots}

    assert brightest(0) == {(10, 10), (10, 14)}  # identity
    assert brightest(1) == {(10, 13), (10, 17)}  # 3 px right
    assert brightest(2) == {(13, 10), (13, 14)}  # 3 px down
    assert (10, 10) in brightest(3) and (10, 14) not in brightest(3)  # rotated about the centre
    assert out[3, 0, :, 14].max() < 200  # the right-hand pixel left its column
    assert (10, 10) in brightest(4) and (10, 14) not in brightest(4)  # sheared vertically


def test_trivial_augment_comes_last_and_changes_the_images_not_drawn_identity() -> None:
    images = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 255
    before = BatchAugment(**_trivial_config(trivial=False).model_dump(), seed=5)(images)
    on = BatchAugment(**_trivial_config().model_dump(), seed=5)
    out = on(images)
    on.seed(5)
    on.params(N, 8, 8)  # the draws before TrivialAugment's, in the call's order
    op, _ = on.trivial_params(N)
    identity = op == 0
    torch.testing.assert_close(out[identity], before[identity])  # same draws before it
    changed = (out - before).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert changed[~identity].double().mean() > 0.9  # a few are no-ops (magnitude 0, grey)
    assert out.min() >= 0 and out.max() <= 255
