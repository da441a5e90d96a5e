"""Small-image datasets held as one uint8 tensor on the training device, batched by indexing.

Design decisions:
- CIFAR-sized data (50k images of 32x32 are 150 MB) is decoded once into a uint8 tensor and kept in memory,
  on the GPU when training there: a batch is one index operation, so the device never waits on PIL or on
  DataLoader workers. Larger data (ImageNet) keeps the DataLoader path (workers, pinned memory).
- A source that decodes files (items.Decoded: a folder) is decoded once and cached as safetensors (no pickle)
  under its own key (`cache_key`: for a folder every file's path, size and modification time plus the decode
  settings, no file read), in the first writable of its `cache_dirs` (`.mae-cache/` beside the images, else
  ~/.cache/mae-torch/tensors), so editing, adding or removing an image makes a new cache. This module knows
  no source.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset

from .items import Decoded, TensorImages

MAX_BYTES = {"cpu": 8 << 30, "cuda": 4 << 30}  # larger datasets stay on the DataLoader path


def in_memory(ds: Dataset, device: torch.device, num_workers: int = 0) -> TensorImages | None:
    """`ds` as one uint8 tensor with labels (-1 when unlabeled), or None when it is too large to hold."""
    if isinstance(ds, TensorImages):
        return ds
    if isinstance(ds, Subset):
        parent = in_memory(ds.dataset, device, num_workers)
        if parent is None:
            return None
        idx = torch.as_tensor(ds.indices, dtype=torch.long)
        return TensorImages(parent.images[idx], None if parent.labels is None else parent.labels[idx])
    if isinstance(ds, Decoded):
        size = len(ds) * len(ds.mode) * ds.img_size**2
        return decode_cached(ds, num_workers) if size <= MAX_BYTES.get(device.type, 0) else None
    return None


def cache_path(ds: Decoded) -> Path:
    """Where the decoded tensor of `ds` is cached: its key, in the first writable of its cache folders."""
    return cache_folder(ds) / f"{ds.cache_key()}.safetensors"


def cache_folder(ds: Decoded) -> Path:
    for folder in ds.cache_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError("no writable cache folder")


def decode_cached(ds: Decoded, num_workers: int = 0) -> TensorImages:
    """Decode every image of `ds` once (in parallel workers), or read the cached result."""
    path = cache_path(ds)
    held = getattr(ds, "decoded", None)
    if held is None or held[0] != path:  # the training and validation splits share one decode
        ds.decoded = path, read_or_decode(ds, path, num_workers)
    return ds.decoded[1]


def read_or_decode(ds: Decoded, path: Path, num_workers: int) -> TensorImages:
    if path.exists():
        t = load_file(str(path))
        return TensorImages(t["images"], t["labels"] if ds.labels is not None else None)
    loader = DataLoader(ds, batch_size=256, num_workers=num_workers, generator=torch.Generator())  # spares the RNG
    images, labels = zip(*loader)
    images, labels = torch.cat(images), torch.cat(labels).long()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes of one torchrun may race here
    save_file({"images": images.contiguous(), "labels": labels}, str(tmp))
    tmp.replace(path)
    return TensorImages(images, labels if ds.labels is not None else None)


class DeviceBatches:
    """A TensorImages moved to the device once; `batches(order, n)` yields (uint8 images, labels) slices."""

    def __init__(self, ds: TensorImages, device: torch.device):
        self.images = ds.images.to(device)
        labels = ds.labels if ds.labels is not None else torch.full((len(ds),), -1)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, order: torch.Tensor, batch: int, drop_last: bool = True):
        order = order.to(self.images.device)
        for i in range(0, len(order) - batch + 1 if drop_last else len(order), batch):
            idx = order[i : i + batch]
            yield self.images[idx], self.labels[idx]
