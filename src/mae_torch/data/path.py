"""How batches reach the training step: one object per run, chosen once, that the engine iterates.

Design decisions:
- Two paths behind one interface (`train_batches`, `val_batches`, `augment`, `describe`):
  * on the device (memory.py): small data sets (CIFAR-sized) decoded once into one uint8 tensor on the
    training device; a batch is one index operation, and crop, flip and RandAugment run batched there;
  * streaming (stream.py): images decoded in DataLoader workers (persistent, prefetching, pinned memory) and
    augmented from the original image as the official code does; validation Resize(img_size / crop_pct) +
    CenterCrop. Random erasing (and mixup/cutmix, in the task) still run on the device, on the batch.
- The streaming path is taken when the data does not fit (memory.MAX_BYTES) or with `--no-in-memory`.
  Workers only ever see the indices of this process's slice, in the engine's seeded order, with each image's
  augmentation seed, so a resumed run and every torchrun process read exactly what an uninterrupted run would.
- Sources whose items share files (tar shards: items.Decoded.groups) are read in windows on the streaming path:
  an epoch visits the files in a seeded random order, SHARD_WINDOW at a time, the items of a window shuffled
  together, so every process's workers read a few files at any moment (`epoch_order`); each item is still seen
  once per epoch and the order is the engine's seeded one, so resume and the per-rank slices hold.
- Unreadable files are found where they are read, in the workers (folder.ImageFiles): the run stops with the
  file's name, or with `--skip-bad-images` the file is replaced by the next readable one and counted.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..augment import Augment
from ..config import ModelConfig, TrainConfig
from .memory import DeviceBatches, in_memory
from .splits import files_of, with_files
from .stream import Order, Seeded, train_transform

SHARD_WINDOW = 8  # files (tar shards) whose items one stretch of a streaming epoch reads, shuffled together


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
        self.groups: torch.Tensor | None = None  # the file of each training item, read by windows (streaming)
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
        if streaming:
            self.groups = grouping(train)
            train = Seeded(train)
        self.train, self.val = train, val
        self.augment = Augment(reprob=tc.reprob, device=device) if streaming else on_device
        self.describe = f"by DataLoader, {workers} workers" + (", augmented there" if streaming else "")

    def epoch_order(self, n: int, g: torch.Generator) -> torch.Tensor:
        """The n training items in one epoch's order, drawn from `g`: a permutation, or by windows of files."""
        order = torch.randperm(n, generator=g)
        if self.groups is None:
            return order
        window = torch.randperm(int(self.groups.max()) + 1, generator=g)[self.groups] // SHARD_WINDOW  # (n,)
        return order[torch.argsort(window[order], stable=True)]

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


def grouping(ds: Dataset) -> torch.Tensor | None:
    """The file of each item of a split, where its source's items share files (items.Decoded.groups)."""
    base = files_of(ds)
    groups = getattr(base, "groups", None)
    if groups is None:
        return None
    return groups[torch.as_tensor(ds.indices)] if hasattr(ds, "indices") else groups
