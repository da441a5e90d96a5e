"""Splits of a source: validation carved from the training images, a held-out test part, label subsets.

Design decisions:
- Validation never sees test data: it comes from a source's own val split, or is carved from the training
  images (stratified by class, seeded). Test splits belong to `build_eval_dataset` only, so choosing the best
  epoch cannot leak the numbers we report. Data without a test split can set one aside: `test_fraction` holds
  out a stratified part of the training images by a fixed seed (HOLDOUT_SEED: the same images whatever
  `--seed`), before validation is carved; training never sees it.
- A split of a split indexes the base dataset directly (`Split`), so the device path and `files_of` see one
  level, and keeps `labels`, so callers can still tell labeled from unlabeled.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset, Subset

from ..errors import MAEError
from .items import Decoded

HOLDOUT_SEED = 20_211_111  # the test_fraction carve's: fixed, so every seed and stage holds out the same images


class Split(Subset):
    """A Subset that keeps the `labels` attribute; a split of a split indexes the base dataset directly."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        if isinstance(dataset, Split):
            dataset, indices = dataset.dataset, [dataset.indices[i] for i in indices]
        super().__init__(dataset, indices)
        parent = dataset.labels
        if parent is None:
            self.labels = None
        elif isinstance(parent, torch.Tensor):
            self.labels = parent[torch.tensor(indices, dtype=torch.long)]
        else:
            self.labels = [parent[i] for i in indices]


def files_of(ds: Dataset) -> Decoded | None:
    """The decoding source under a split (or the dataset itself), else None (images already in memory)."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    return base if isinstance(base, Decoded) else None


def with_files(ds: Dataset, **settings) -> Dataset:
    """The same split of a copy of its source with other settings (transform, crop_pct) and its own count of
    skipped images: the training and validation splits of one source decode differently when streaming."""
    files = copy.copy(files_of(ds))
    for k, v in settings.items():
        setattr(files, k, v)
    files.skipped = torch.zeros((), dtype=torch.long).share_memory_()
    return Split(files, ds.indices) if isinstance(ds, Subset) else files


def carve(ds: Dataset, fraction: float, seed: int, where: str) -> tuple[Dataset, Dataset]:
    """(the rest, round(fraction * n) items per class held out (all items if unlabeled)), seeded, stratified.

    Each group with 2+ items gives at least 1 to the held-out part and keeps at least 1 for training.
    fraction == 0 gives an empty held-out part on purpose (the user asked for none).
    """
    labels = [0] * len(ds) if ds.labels is None else [int(v) for v in ds.labels]
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    g = torch.Generator().manual_seed(seed)
    held: list[int] = []
    for y in sorted(groups):
        idx = groups[y]
        # a group's last image stays in training: a class with no training images cannot be learned
        k = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if fraction > 0 else 0
        held += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    if fraction > 0 and not held:
        raise MAEError(
            f"{where} is too small to hold out validation images ({len(ds)} images); add images or provide PATH/val"
        )
    out = set(held)
    return Split(ds, [i for i in range(len(ds)) if i not in out]), Split(ds, sorted(held))


def hold_out(ds: Dataset, fraction: float, where: str) -> tuple[Dataset, Dataset | None]:
    """(the rest, the held-out test part) of the training images: `fraction` of each class, by HOLDOUT_SEED."""
    if not 0 <= fraction < 1:
        raise MAEError(f"test_fraction must be in [0, 1), got {fraction}; use e.g. 0.1")
    return carve(ds, fraction, HOLDOUT_SEED, where) if fraction > 0 else (ds, None)


def label_subset(ds: Dataset, fraction: float = 1.0, per_class: int = 0, seed: int = 0) -> Dataset:
    """A deterministic, class-balanced subset of a labeled split for low-label fine-tuning.

    per_class > 0 keeps that many images of each class (all of a smaller class); otherwise round(fraction * n_c)
    per class, at least 1. The choice depends only on the seed and the labels, so scratch and pretrained runs
    with the same seed see the same labeled images; the rest of the data stays usable for pretraining.
    """
    if per_class <= 0 and fraction >= 1:
        return ds
    if not 0 < fraction <= 1:
        raise MAEError(f"label_fraction must be in (0, 1], got {fraction}")
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(int(v) for v in ds.labels):
        groups.setdefault(y, []).append(i)
    g = torch.Generator().manual_seed(seed + 1)  # apart from the validation carve's stream
    keep: list[int] = []
    for y in sorted(groups):
        idx = groups[y]
        k = min(per_class, len(idx)) if per_class > 0 else max(1, round(fraction * len(idx)))
        keep += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    return Split(ds, sorted(keep))
