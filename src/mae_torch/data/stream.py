"""The streaming path's pieces: the official training transform, run in DataLoader workers from the original
image (pretraining RandomResizedCrop (bicubic) + flip, fine-tuning the same with timm's RandAugment
`rand-m9-mstd0.5-inc1`), each image seeded by its own number (`Seeded`), and the sampler one DataLoader serves
every epoch's order with (`Order`).

The transform is torchvision's v2 on uint8 tensors: the same crops and flips from the same random numbers as the
PIL transform of the official code, the bicubic antialiased resize in PyTorch's uint8 kernel, whose pixels are
PIL's to within 2 levels of 255 (tests/test_stream.py), at a fraction of its time; timm's RandAugment, which
needs PIL, gets the 224-pixel crop as a PIL image.

Each training image carries its own augmentation seed, drawn with the epoch's order: a worker seeds the random
crop, flip and RandAugment from it, so the augmented images depend neither on the number of workers nor on
where a run was resumed.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import Dataset, Sampler, get_worker_info

from ..config import ModelConfig, TrainConfig
from .items import as_tensor

BICUBIC = T.InterpolationMode.BICUBIC


def train_transform(m: ModelConfig, tc: TrainConfig):
    """uint8 tensor (C, H, W) -> uint8 tensor (C, img_size, img_size): the official code's training transform."""
    s = m.img_size
    ops = [
        T.RandomResizedCrop(s, scale=tuple(tc.crop_scale), interpolation=BICUBIC, antialias=True)
        if tuple(tc.crop_scale) != (1.0, 1.0)
        else T.Compose([T.Resize(s, interpolation=BICUBIC, antialias=True), T.CenterCrop(s)])
    ]
    if tc.translate:
        ops.append(T.RandomCrop(s, padding=tc.translate))
    if tc.hflip:
        ops.append(T.RandomHorizontalFlip())
    if tc.randaugment:  # as timm's create_transform: translations of 45% of the side, grey fill at the mean
        hparams = {"translate_const": int(s * 0.45), "img_mean": tuple(round(255 * v) for v in m.mean)}
        ops.append(OnPIL(rand_augment_transform(f"rand-m9-n{tc.randaugment}-mstd0.5-inc1", hparams)))
    return T.Compose(ops)


class OnPIL:
    """A PIL -> PIL transform (timm's RandAugment) applied to a uint8 tensor (C, H, W)."""

    def __init__(self, op):
        self.op = op

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hwc = x.permute(1, 2, 0).numpy()
        im = self.op(Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc))
        return as_tensor(im)

    def __repr__(self) -> str:
        return f"OnPIL({self.op!r})"


def seed_all(seed: int) -> None:
    """Seed what the transforms draw from: torch (torchvision), Python and NumPy (timm's RandAugment)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class Seeded(Dataset):
    """Item (i, seed) -> item i of `inner` with torch's, Python's and NumPy's random numbers seeded by `seed`.
    In a DataLoader worker the random state is the worker's own and is simply reseeded; in the main process (no
    workers) the caller's random state is restored afterwards."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        if get_worker_info() is not None:
            seed_all(seed)
            return self.inner[i]
        py, npy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                seed_all(seed)
                return self.inner[i]
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class Order(Sampler):
    """The indices of the next pass, set before each one: lets one DataLoader (and its persistent workers)
    serve every epoch in the engine's own order."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
