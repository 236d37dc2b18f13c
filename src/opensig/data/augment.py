"""Training augmentation of a whole batch at once, on the device the model runs on.

Per-image augmentation in the loader (albumentations, one call per image) cost more than 7%
of a training step on CPU, where no spare core hides it, and on GPU it needs worker
processes to keep the card fed. Here one batch is augmented by a handful of tensor
operations: every image's random crop, rotation and flip become one affine map, sampled
in one ``grid_sample`` call; brightness and contrast are one multiply-add. The loader only
hands over images already at the model's size (the decode cache, or ``fit_to``).

What each image gets, drawn independently (the distributions of the albumentations
transforms opensig used before, with the same settings; crops are placed continuously
rather than on whole pixels, and resampled once rather than cropped, resized and rotated):

- ``RandomResizedCrop``: a crop covering ``U(scale_min, 1)`` of the area, aspect ratio
  log-uniform in [0.9, 1.1], placed uniformly inside the image, resized to the full size;
- ``Affine(rotate)``: with probability 1/2, a rotation by ``U(-rotate, rotate)`` degrees
  about the crop's centre (corners outside the image are black);
- ``HorizontalFlip``: with probability 1/2, when ``hflip`` (the classes allow mirroring);
- ``RandomBrightnessContrast``: with probability 1/2, ``x * alpha + beta * 255`` with
  ``alpha = 1 + U(-b, b)`` and ``beta = U(-b, b)``, clipped to [0, 255];
- random erasing (Zhong et al. 2020, timm's ``RandomErasing`` in ``pixel`` mode): with
  probability ``erase``, a rectangle of ``U(0.02, 1/3)`` of the area, aspect ratio
  log-uniform in [0.3, 3.3], placed uniformly, replaced by uniform noise. Its draws come
  after the others, and none are made when ``erase`` is 0 (the batches stay as they were).
- TrivialAugment (Mueller & Hutter 2021, torchvision's ``TrivialAugmentWide`` space), when
  ``trivial``: after the photometric step and before erasing, each image gets one operation
  drawn uniformly from the 14 below, at a magnitude drawn uniformly from 31 bins (its sign
  too, where it has one): identity; shear x/y (0-0.99) and rotation (0-135 degrees) about
  the centre; translation x/y by up to 1/7 of the side (torchvision's 32 px at 224 px);
  brightness, colour, contrast and sharpness by a factor ``1 +- (0-0.99)``; posterize
  (8-2 bits), solarize (threshold 255-0), autocontrast and equalize. Its draws come after
  the photometric step's, and none are made when it is off.

The draws come from the augmentation's own generator on the CPU (``seed`` it, e.g. once
per epoch): the same seed gives the same batch on every device and with any number of
loader workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_RATIO = (0.9, 1.1)  # the crop's aspect ratio range (width / height)
_ERASE_AREA = (0.02, 1 / 3)  # random erasing: share of the image (timm's defaults)
_ERASE_RATIO = (0.3, 1 / 0.3)  # ... and aspect ratio range
TRIVIAL_OPS = (  # TrivialAugmentWide's operations, in torchvision's order
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
_BINS = 31  # magnitude bins (torchvision's default)
_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
# The signed operations' largest magnitude (their sign is drawn too):
_TOP = {"shear_x": 0.99, "shear_y": 0.99, "translate_x": 1 / 7, "translate_y": 1 / 7}
_TOP |= {"rotate": 135.0, "brightness": 0.99, "color": 0.99, "contrast": 0.99}
_TOP |= {"sharpness": 0.99}


class BatchAugment:
    """Random crop, rotation, flip and brightness/contrast of a float NCHW batch (0-255).

    The settings are plain values (``train.augment``'s, passed by the caller), so that this
    module does not depend on the config."""

    def __init__(
        self,
        *,
        scale_min: float,
        rotate: float,
        hflip: bool,
        brightness_contrast: float,
        erase: float = 0.0,
        trivial: bool = False,
        seed: int = 0,
    ) -> None:
        self.scale_min, self.rotate, self.hflip = scale_min, rotate, hflip
        self.brightness_contrast, self.erase, self.trivial = brightness_contrast, erase, trivial
        self.generator = torch.Generator().manual_seed(seed)

    def seed(self, value: int) -> None:
        """Restart the draws from ``value`` (the training loop does it every epoch)."""
        self.generator.manual_seed(value)

    def params(
        self, n: int, height_px: int, width_px: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's affine map (n, 2, 3) from output to input coordinates in
        ``affine_grid``'s [-1, 1] convention, and its contrast and brightness factors (n,).

        A crop at the image's edge samples the edge pixels' centres, not beyond them (which
        would blend in the black outside): the crop's centre stays within its range shrunk
        by half a pixel on each side.
        """
        u = torch.rand(n, 10, generator=self.generator, dtype=torch.float64)
        area = self.scale_min + (1.0 - self.scale_min) * u[:, 0]
        log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        width = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the side
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        centre_x = (1.0 - width) * (1.0 - 1.0 / width_px) * (2.0 * u[:, 2] - 1.0)
        centre_y = (1.0 - height) * (1.0 - 1.0 / height_px) * (2.0 * u[:, 3] - 1.0)
        angle = torch.deg2rad(self.rotate * (2.0 * u[:, 4] - 1.0)) * (u[:, 5] < 0.5)
        flip = 1.0 - 2.0 * ((u[:, 6] < 0.5) & self.hflip)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([width * cos * flip, -width * sin, centre_x], dim=1),
                torch.stack([height * sin * flip, height * cos, centre_y], dim=1),
            ],
            dim=1,
        )
        b = self.brightness_contrast
        photometric = u[:, 7] < 0.5
        contrast = 1.0 + b * (2.0 * u[:, 9] - 1.0) * photometric
        brightness = b * (2.0 * u[:, 8] - 1.0) * photometric
        return theta.float(), contrast.float(), brightness.float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """A float NCHW batch on any device, pixel values 0-255 -> its augmented copy."""
        n, _, height, width = images.shape
        theta, contrast, brightness = (t.to(images.device) for t in self.params(n, height, width))
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, "bilinear", "zeros", align_corners=False)
        out = out * contrast.view(-1, 1, 1, 1) + (brightness * 255.0).view(-1, 1, 1, 1)
        out = out.clamp_(0.0, 255.0)
        if self.trivial:
            op, magnitude = self.trivial_params(n)
            out = trivial_augment(out, op.to(images.device), magnitude.to(images.device))
        if self.erase > 0:
            mask = self.erase_mask(n, height, width).to(images.device)
            noise = torch.rand(out.shape, generator=self.generator) * 255.0
            out = torch.where(mask.unsqueeze(1), noise.to(images.device, out.dtype), out)
        return out

    def trivial_params(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's TrivialAugment operation (an index into :data:`TRIVIAL_OPS`) and its
        magnitude in the operation's own unit (see :func:`trivial_augment`)."""
        op = torch.randint(len(TRIVIAL_OPS), (n,), generator=self.generator)
        level = torch.randint(_BINS, (n,), generator=self.generator).double() / (_BINS - 1)
        sign = 1.0 - 2.0 * torch.randint(2, (n,), generator=self.generator).double()
        magnitude = torch.zeros(n, dtype=torch.float64)
        for index, name in enumerate(TRIVIAL_OPS):
            chosen = op == index
            if name in _TOP:
                magnitude[chosen] = _TOP[name] * level[chosen] * sign[chosen]
            elif name == "posterize":  # bits kept: 8 down to 2 (torchvision's rounding)
                magnitude[chosen] = torch.round(8 - 6 * level[chosen])
            elif name == "solarize":  # threshold: 255 down to 0
                magnitude[chosen] = 255.0 * (1.0 - level[chosen])
        return op, magnitude.float()

    def erase_mask(self, n: int, height_px: int, width_px: int) -> torch.Tensor:
        """(n, H, W) booleans: the pixels each image's erased rectangle covers (none for
        the images not drawn, probability ``1 - erase``)."""
        u = torch.rand(n, 5, generator=self.generator, dtype=torch.float64)
        area = _ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * u[:, 0]
        log_lo, log_hi = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        h = (torch.sqrt(area / ratio) * height_px).round().clamp(1, height_px)
        w = (torch.sqrt(area * ratio) * width_px).round().clamp(1, width_px)
        top = ((height_px - h) * u[:, 2]).floor()
        left = ((width_px - w) * u[:, 3]).floor()
        rows = torch.arange(height_px, dtype=torch.float64).view(1, -1, 1)
        cols = torch.arange(width_px, dtype=torch.float64).view(1, 1, -1)
        inside_rows = (rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
        inside_cols = (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1))
        return inside_rows & inside_cols & (u[:, 4] < self.erase).view(-1, 1, 1)


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor * (images - degenerate)``, clipped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)).clamp(0.0, 255.0)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, kept with the images' channel count (a grey image is its own)."""
    if images.shape[1] != 3:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand_as(images)


def _smoothed(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (centre 5, neighbours 1, / 13), edge pixels kept."""
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5.0
    channels = images.shape[1]
    weight = (kernel / 13.0).expand(channels, 1, 3, 3)
    out = images.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(images, weight, groups=channels)
    return out


def _geometric(images: torch.Tensor, name: str, magnitude: torch.Tensor) -> torch.Tensor:
    """Shear, translation or rotation about the centre, corners outside the image black."""
    n = images.shape[0]
    theta = torch.eye(2, 3, device=images.device).repeat(n, 1, 1)
    if name == "shear_x":
        theta[:, 0, 1] = magnitude
    elif name == "shear_y":
        theta[:, 1, 0] = magnitude
    elif name == "translate_x":  # content moves right by the share: sample from the left
        theta[:, 0, 2] = -2.0 * magnitude
    elif name == "translate_y":
        theta[:, 1, 2] = -2.0 * magnitude
    else:
        angle = torch.deg2rad(magnitude)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, "bilinear", "zeros", align_corners=False)


def _apply(images: torch.Tensor, name: str, magnitude: torch.Tensor) -> torch.Tensor:
    """One TrivialAugment operation on a float NCHW batch (0-255), a magnitude per image."""
    from torchvision.transforms.v2 import functional as tvf

    if name in _GEOMETRIC:
        return _geometric(images, name, magnitude)
    if name == "brightness":
        return _blend(images, torch.zeros_like(images), 1.0 + magnitude)
    if name == "color":
        return _blend(images, _grey(images), 1.0 + magnitude)
    if name == "contrast":
        mean = _grey(images).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(images, mean.expand_as(images), 1.0 + magnitude)
    if name == "sharpness":
        return _blend(images, _smoothed(images), 1.0 + magnitude)
    pixels = images.round().to(torch.uint8)
    if name == "posterize":
        step = (2.0 ** (8 - magnitude)).view(-1, 1, 1, 1)
        return torch.floor(pixels.float() / step) * step
    if name == "solarize":
        threshold = magnitude.view(-1, 1, 1, 1)
        return torch.where(pixels.float() >= threshold, 255.0 - pixels.float(), pixels.float())
    if name == "autocontrast":
        return tvf.autocontrast(pixels).float()
    return tvf.equalize(pixels).float()


def trivial_augment(
    images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor
) -> torch.Tensor:
    """Each image of a float NCHW batch (0-255) through its own TrivialAugment operation
    (``op`` indexes :data:`TRIVIAL_OPS`; ``magnitude``: shear factor, share of the side,
    degrees, enhancement ``factor - 1``, bits kept or solarize threshold): one call per
    operation on the images that drew it, not one per image."""
    out = images.clone()
    for index, name in enumerate(TRIVIAL_OPS[1:], start=1):
        chosen = (op == index).nonzero().flatten()
        if chosen.numel():
            out[chosen] = _apply(images[chosen], name, magnitude[chosen])
    return out
