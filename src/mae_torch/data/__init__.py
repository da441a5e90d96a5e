"""Datasets: CIFAR-10/100 through torchvision, a local folder of images, WebDataset tar shards, or a Hub dataset.

Design decisions:
- Sources (cifar.py, folder.py, shards.py, hf.py) yield the items of items.py; splits.py carves validation, the
  held-out test part and label subsets; the batch paths (path.py: memory.py on the device, stream.py through
  DataLoader workers) take any split and know no source.
- A folder, a set of shards or a Hub dataset has up to three splits of its own: train, val and test
  (PATH/train, PATH/val, PATH/test; shards named train*, val*, test*; the Hub dataset's train, validation and
  test). Without val, validation is carved from the training images (stratified, seeded); test (CIFAR's test
  split too) belongs to `build_eval_dataset` only.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from ..errors import MAEError
from .cifar import cifar, is_cifar
from .folder import IMAGE_EXTENSIONS, ImageFiles, check_folder, folder_images, list_images, split_folders
from .hf import is_hub
from .items import TensorImages, default_data_root
from .splits import HOLDOUT_SEED, carve, hold_out, label_subset

__all__ = [
    "HOLDOUT_SEED",
    "IMAGE_EXTENSIONS",
    "ImageFiles",
    "TensorImages",
    "build_datasets",
    "build_eval_dataset",
    "default_data_root",
    "has_test_split",
    "label_subset",
    "list_images",
]


def is_shards(data: str) -> bool:
    """A brace pattern or a .tar file, or a folder holding .tar files and no (visible) subfolders."""
    path = os.path.expanduser(data)
    if ".tar" in path and ("{" in path or os.path.isfile(path) or not os.path.exists(path)):
        return True
    if not os.path.isdir(path):
        return False
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    folders = any(os.path.isdir(os.path.join(path, n)) for n in names)
    return not folders and any(n.endswith(".tar") for n in names)


def open_splits(data: str, img_size: int, in_chans: int, crop_pct: float, skip_bad: bool, need_train=True) -> dict:
    """`data` (not CIFAR) as {"kind", "train", "val", "test"}: each split a function returning (dataset, classes,
    where it is), or None where there is none, so a split that is not used is not listed. need_train False
    (evaluation): data without a training split is fine."""
    if is_hub(data):
        from .hf import HubImages, hub_splits

        parts = hub_splits(data)

        def hub(split: str):
            ds = HubImages(parts[split], data, img_size, in_chans, crop_pct, skip_bad)
            return ds, ds.classes, data

        return lazy_splits("hub", hub, lambda k: parts[k] is not None)
    if is_shards(data):
        from .shards import ShardSamples, shard_splits

        paths = shard_splits(data, need_train)

        def shards(split: str):
            ds = ShardSamples(paths[split], img_size, in_chans, crop_pct, skip_bad=skip_bad)
            return ds, ds.classes, data

        return lazy_splits("shards", shards, lambda k: bool(paths[k]))
    roots = dict(zip(("train", "val", "test"), split_folders(check_folder(data), need_train)))

    def folder(split: str):
        return *folder_images(roots[split], img_size, in_chans, crop_pct, skip_bad), roots[split]

    return lazy_splits("folder", folder, lambda k: roots[k] is not None)


def lazy_splits(kind: str, split, exists) -> dict:
    """Each split as a function that opens it (None where there is none)."""
    return {"kind": kind, **{k: (lambda k=k: split(k)) if exists(k) else None for k in ("train", "val", "test")}}


def build_datasets(
    data: str,
    *,
    data_root: str | None,
    img_size: int,
    in_chans: int = 3,
    val_fraction: float = 0.1,
    seed: int = 0,
    need_labels: bool = False,
    skip_bad: bool = False,
    test_fraction: float = 0.0,
) -> tuple[Dataset, Dataset, list[str] | None]:
    """Train and validation splits of `data` and its class names (None for an unlabeled set).

    skip_bad: an image that does not decode is replaced by the next readable one, with a warning and a count,
    where it is read (nothing is decoded here: listing 1.28M files is the whole start-up cost).
    test_fraction: this share of the training images is held out first (see `build_eval_dataset`)."""
    if not 0 <= val_fraction < 1:
        raise MAEError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.1")
    if is_cifar(data):  # validation from the TRAINING split: CIFAR's test split is for evaluation only
        train, classes = cifar(data, data_root, True, img_size, in_chans)
        return (*carve(hold_out(train, test_fraction, data)[0], val_fraction, seed, data), classes)
    splits = open_splits(data, img_size, in_chans, 1.0, skip_bad)
    train, classes, where = splits["train"]()
    if need_labels:
        require_labels(splits["kind"], where, classes)
    train = hold_out(train, test_fraction, where)[0]
    if splits["val"] is None:
        return (*carve(train, val_fraction, seed, where), classes)
    val, val_classes, _ = splits["val"]()
    if classes is None:
        val.labels = None  # an unlabeled train set makes the whole run unlabeled
    elif val_classes != classes:
        missing = sorted(set(classes) - set(val_classes or []))
        extra = sorted(set(val_classes or []) - set(classes))
        raise MAEError(
            f"the classes of {data}'s validation split differ from its training split's: missing in val "
            f"{missing}, only in val {extra}; give val/ the same <class>/ subfolders as train/"
        )
    return train, val, classes


def has_test_split(data: str) -> bool:
    """Whether `data` has a test split of its own: CIFAR's, a folder's test/, or test*.tar shards."""
    if is_cifar(data):
        return True
    if is_hub(data):
        from .hf import hub_splits

        return hub_splits(data)["test"] is not None
    if is_shards(data):
        from .shards import shard_splits

        return bool(shard_splits(data, need_train=False)["test"])
    return os.path.isdir(os.path.join(os.path.expanduser(data), "test"))


def build_eval_dataset(
    data: str,
    *,
    data_root: str | None,
    img_size: int,
    in_chans: int = 3,
    crop_pct: float = 1.0,
    test_fraction: float = 0.0,
) -> tuple[Dataset, list[str]]:
    """The labeled split to evaluate on (CIFAR's test split; a folder's test/, else val/, else train/, else the folder;
    shards' test split, else val, else all) and its class names; images of another size are resized to
    img_size / crop_pct (shorter side) and centre-cropped. test_fraction > 0: the training images that
    `build_datasets` held out with the same fraction."""
    if is_cifar(data):
        if test_fraction > 0:
            train, classes = cifar(data, data_root, True, img_size, in_chans)
            return hold_out(train, test_fraction, data)[1], classes
        return cifar(data, data_root, False, img_size, in_chans)
    splits = open_splits(data, img_size, in_chans, crop_pct, False, need_train=test_fraction > 0)
    if test_fraction > 0:
        ds, classes, where = splits["train"]()
        require_labels(splits["kind"], where, classes, min_classes=1)
        return hold_out(ds, test_fraction, where)[1], classes
    ds, classes, where = (splits["test"] or splits["val"] or splits["train"])()
    require_labels(splits["kind"], where, classes, min_classes=1)  # evaluating on a subset of the classes is fine
    return ds, classes


def require_labels(kind: str, where: str, classes: list[str] | None, min_classes: int = 2) -> None:
    if classes is None and kind == "hub":
        raise MAEError(
            f"the Hub dataset {where} has no label column (a ClassLabel feature, or one named label); "
            "fine-tuning needs one, an unlabeled dataset is valid for pretraining only"
        )
    if classes is None and kind == "shards":
        raise MAEError(
            f"the shards {where} carry no labels (KEY.cls or KEY.json beside each image); fine-tuning needs "
            "them, unlabeled shards are valid for pretraining only"
        )
    if classes is None:
        raise MAEError(
            f"{where} has no class subfolders, so it is unlabeled: fine-tuning needs {where}/<class>/image "
            "files; an unlabeled folder is valid for pretraining only"
        )
    if len(classes) < min_classes:
        raise MAEError(f"{where} has only the class folder {classes}; classification needs at least 2 classes")
