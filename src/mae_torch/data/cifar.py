"""CIFAR-10/100 through torchvision, held in memory as one uint8 tensor (150 MB for 50k images at 32x32),
resized once up front."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import MAEError
from .items import TensorImages, default_data_root, short

# name -> (display name, the archive torchvision looks for in its root before downloading)
CIFAR = {
    "cifar10": ("CIFAR-10", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR-100", "cifar-100-python.tar.gz"),
}


def is_cifar(data: str) -> bool:
    return data.lower() in CIFAR


def cifar(name: str, data_root: str | None, train: bool, img_size: int, in_chans: int = 3):
    """CIFAR split as in-memory TensorImages (uint8 (N, C, img_size, img_size)) and its class names."""
    import torchvision

    name = name.lower()
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    title, archive = CIFAR[name]
    root = os.path.expanduser(data_root) if data_root else default_data_root()
    try:
        ds = cls(root=root, train=train, download=True)
    except Exception as e:  # no network surfaces as URLError, OSError or RuntimeError, depending on where
        raise MAEError(
            f"could not download {title} into {root} ({short(e)}); without network, pass a local "
            "image folder with --data PATH (ImageFolder layout: PATH/<class>/*.png), "
            f"or put the torchvision archive {archive} in --data-root"
        ) from e
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    if img_size != images.shape[-1]:
        images = torch.cat([resize(chunk, img_size) for chunk in images.split(1024)])  # bounded float memory
    if in_chans == 1:
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        images = rgb_to_grayscale(images)  # (N, 1, H, W) uint8
    return TensorImages(images, torch.tensor(ds.targets, dtype=torch.long)), list(ds.classes)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, size, size), bicubic with antialiasing like PIL's resize."""
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)
