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
from timm.data.random_erasing import RandomErasing
from torchvision.transforms.v2 import RandAugment

RA_GROUP = 16  # images that share one draw of RandAugment's ops (see Augment)


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


def random_translate(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """(B, C, H, W) -> the same shape: each image shifted by whole pixels, up to `pixels` each way, the border
    zero-filled (the mean colour, after normalization): pad-and-random-crop for a whole batch at once, as one
    gather from the zero-padded batch (whole-pixel shifts need no interpolation)."""
    B, C, H, W = x.shape
    shift = torch.randint(-pixels, pixels + 1, (2, B), device=x.device)  # (x, y) shift of each image
    padded = F.pad(x, (pixels, pixels, pixels, pixels))  # (B, C, H + 2p, W + 2p)
    rows = torch.arange(H, device=x.device) + pixels + shift[1][:, None]  # (B, H): source row of each output row
    cols = torch.arange(W, device=x.device) + pixels + shift[0][:, None]  # (B, W)
    idx = (rows[:, :, None] * (W + 2 * pixels) + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    return padded.flatten(2).gather(2, idx).view(B, C, H, W)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)


class Augment:
    """A training batch's augmentation: uint8 images -> normalized, augmented floats, all on the device.

    RandAugment (torchvision's, on uint8) comes before normalization. It draws its ops once per call, so it is
    called on groups of `RA_GROUP` images: each image still gets uniformly drawn ops (the same distribution as
    image by image) at 1/16 of the calls, whose Python and kernel-launch overhead (about 0.3 ms an image) would
    otherwise bound a GPU's fine-tuning step. Crop and flip are batched here; random erasing is timm's, on the
    normalized batch (the fine-tuning recipe of the paper, after DeiT). Settings that are off cost nothing.
    """

    def __init__(self, crop_scale=(1.0, 1.0), hflip=False, randaugment=0, reprob=0.0, device="cpu", translate=0):
        self.crop_scale, self.hflip, self.translate = tuple(crop_scale), hflip, translate
        # magnitude 9 of 10 as timm's rand-m9 (the paper's, DeiT's); torchvision's default 31 bins would be 9/30
        self.randaugment = RandAugment(randaugment, magnitude=9, num_magnitude_bins=11) if randaugment else None
        self.erase = RandomErasing(reprob, mode="pixel", device=str(device)) if reprob else None

    def __call__(self, images: torch.Tensor, norm) -> torch.Tensor:
        if self.randaugment:
            images = torch.cat([self.randaugment(group) for group in images.split(RA_GROUP)])
        x = norm(images)
        if self.crop_scale != (1.0, 1.0):
            x = random_resized_crop(x, self.crop_scale)
        if self.translate:
            x = random_translate(x, self.translate)
        if self.hflip:
            x = random_hflip(x)
        return self.erase(x) if self.erase else x
