"""Batched augmentation on the device: random resized crop and horizontal flip for a whole batch at once.

One affine grid per image and a single `grid_sample` replace per-image PIL transforms, so augmentation costs
little next to the training step and runs wherever the batch is (CPU or GPU). The sampling follows
torchvision's RandomResizedCrop: area fraction uniform in `scale`, log aspect ratio uniform in `ratio`,
a uniform position; a crop that would not fit is clamped to the image instead of being re-drawn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop(
    x: torch.Tensor, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """(B, C, H, W) float -> the same shape: each image a random crop of itself, resized back (bilinear)."""
    B = x.shape[0]
    rand = torch.rand(4, B, device=x.device)
    area = scale[0] + (scale[1] - scale[0]) * rand[0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[1])
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * rand[2] - 1)  # crop centre in [-1, 1] coordinates, keeping the crop inside
    cy = (1 - h) * (2 * rand[3] - 1)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)


def augment(x: torch.Tensor, crop_scale: tuple[float, float], hflip: bool) -> torch.Tensor:
    """The configured training augmentation; crop_scale (1, 1) and hflip False leave the batch untouched."""
    if crop_scale != (1.0, 1.0):
        x = random_resized_crop(x, crop_scale)
    return random_hflip(x) if hflip else x
