"""How batches reach the training step: one object per run, chosen once, that the engine iterates.

Design decisions:
- Two paths behind one interface (`train_batches`, `val_batches`, `augment`, `describe`):
  * on the device: small data sets (CIFAR-sized) decoded once into one uint8 tensor on the training device
    (memdata.py); a batch is one index operation, and crop, flip and RandAugment run batched there;
  * streaming: files decoded in DataLoader workers (persistent, prefetching, pinned memory) from the original
    image, as the official code: pretraining RandomResizedCrop (bicubic) + flip, fine-tuning the same with
    timm's RandAugment `rand-m9-mstd0.5-inc1`, validation Resize(img_size / crop_pct) + CenterCrop. Random
    erasing (and mixup/cutmix, in the task) still run on the device, on the batch.
- The streaming path is taken when the data does not fit (memdata.MAX_BYTES) or with `--no-in-memory`.
  Workers only ever see the indices of this process's slice, in the engine's seeded order, so a resumed run
  and every torchrun process read exactly what an uninterrupted run would. Each training image also carries
  its own augmentation seed, drawn with the epoch's order (`Seeded`): a worker seeds the random crop, flip and
  RandAugment from it, so the augmented images depend neither on the number of workers nor on where a run
  was resumed.
- Unreadable files are found where they are read, in the workers (data.ImageFiles): the run stops with the
  file's name, or with `--skip-bad-images` the file is replaced by the next readable one and counted.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torchvision.transforms as T
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import Augment
from .config import ModelConfig, TrainConfig
from .data import files_of, with_files
from .memdata import DeviceBatches, in_memory

BICUBIC = T.InterpolationMode.BICUBIC


def train_transform(m: ModelConfig, tc: TrainConfig):
    """PIL image -> PIL image (img_size square): the official code's training transform."""
    s = m.img_size
    ops = [
        T.RandomResizedCrop(s, scale=tuple(tc.crop_scale), interpolation=BICUBIC)
        if tuple(tc.crop_scale) != (1.0, 1.0)
        else T.Compose([T.Resize(s, interpolation=BICUBIC), T.CenterCrop(s)])
    ]
    if tc.translate:
        ops.append(T.RandomCrop(s, padding=tc.translate))
    if tc.hflip:
        ops.append(T.RandomHorizontalFlip())
    if tc.randaugment:  # as timm's create_transform: translations of 45% of the side, grey fill at the mean
        hparams = {"translate_const": int(s * 0.45), "img_mean": tuple(round(255 * v) for v in m.mean)}
        ops.append(rand_augment_transform(f"rand-m9-n{tc.randaugment}-mstd0.5-inc1", hparams))
    return T.Compose(ops)


class Seeded(Dataset):
    """Item (i, seed) -> item i of `inner` with Python's, NumPy's and torch's random numbers seeded by `seed`
    (torchvision's transforms draw from torch, timm's RandAugment from Python and NumPy); the caller's random
    state is left as it was, so this also holds in the main process (no workers)."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        py, npy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
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


class DataPath:
    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        m: ModelConfig,
        tc: TrainConfig,
        device: torch.device,
        workers: int,
        mem=True,
    ):
        self.device, self.workers = device, workers
        self.loaders: dict = {}  # (split, batch, drop_last) -> (Order, DataLoader), streaming only
        on_device = Augment(tc.crop_scale, tc.hflip, tc.randaugment, tc.reprob, device, tc.translate)
        train_mem = in_memory(train, device, workers) if mem else None
        self.files = [f for f in (files_of(train), files_of(val)) if f is not None]  # where skips are counted
        if train_mem is not None:
            self.train = DeviceBatches(train_mem, device)
            self.val = DeviceBatches(in_memory(val, device, workers), device)
            self.augment, self.describe = on_device, "as uint8 tensors on the device"
            return
        streaming = files_of(train) is not None
        if streaming:  # decoded and augmented from the original image in the workers; erasing stays here
            train = with_files(train, transform=train_transform(m, tc))
            val = with_files(val, crop_pct=m.crop_pct)
            self.files = [files_of(train), files_of(val)]
            train = Seeded(train)
        self.train, self.val = train, val
        self.augment = Augment(reprob=tc.reprob, device=device) if streaming else on_device
        self.describe = f"by DataLoader, {workers} workers" + (", augmented there" if streaming else "")

    def batches(self, which: str, order: torch.Tensor, batch: int, drop_last: bool, seeds: torch.Tensor | None = None):
        source = self.train if which == "train" else self.val
        if isinstance(source, DeviceBatches):
            return source.batches(order, batch, drop_last)
        key = (which, batch, drop_last)
        if key not in self.loaders:
            sampler = Order()
            loader = DataLoader(
                source,
                batch_size=batch,
                sampler=sampler,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                drop_last=drop_last,
                persistent_workers=self.workers > 0,
                prefetch_factor=4 if self.workers else None,
                generator=torch.Generator(),  # its own: drawing worker seeds must not shift the training RNG
            )
            self.loaders[key] = sampler, loader
        sampler, loader = self.loaders[key]
        sampler.indices = order.tolist() if seeds is None else list(zip(order.tolist(), seeds.tolist()))
        return loader

    def train_batches(self, order: torch.Tensor, batch: int, seeds: torch.Tensor | None = None):
        """(uint8 images, labels) of `order` (this process's indices), `batch` at a time, full batches only.
        `seeds`: each image's augmentation seed on the streaming path (default: drawn from torch's RNG)."""
        if isinstance(self.train, Seeded) and seeds is None:
            seeds = torch.randint(2**62, order.shape)
        return self.batches("train", order, batch, drop_last=True, seeds=seeds)

    def val_batches(self, order: torch.Tensor, batch: int):
        return self.batches("val", order, batch, drop_last=False)

    def close(self) -> None:
        """End the persistent workers now rather than when the loaders are garbage-collected."""
        for _, loader in self.loaders.values():
            if loader._iterator is not None:  # DataLoader has no public call for this
                loader._iterator._shutdown_workers()
        self.loaders = {}

    def skipped(self) -> int:
        """Unreadable training and validation files replaced so far (--skip-bad-images)."""
        return sum(int(f.skipped) for f in self.files)
