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
        seed: int = 0,
    ) -> None:
        self.scale_min, self.rotate, self.hflip = scale_min, rotate, hflip
        self.brightness_contrast, self.erase = brightness_contrast, erase
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
        if self.erase > 0:
            mask = self.erase_mask(n, height, width).to(images.device)
            noise = torch.rand(out.shape, generator=self.generator) * 255.0
            out = torch.where(mask.unsqueeze(1), noise.to(images.device, out.dtype), out)
        return out

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
