"""Hugging Face Hub datasets: `--data hf:NAME[:SPLIT]` through the `datasets` library (an optional extra).

Design decisions:
- NAME is what `datasets.load_dataset` takes: a Hub id (`uoft-cs/cifar10`), or a local folder of parquet (or
  other) files laid out as the Hub's (`data/train-*.parquet`, `data/test-*.parquet`). The Hub's cache and its
  offline mode (`HF_HUB_OFFLINE=1`) apply as they do for every `datasets` user.
- Splits: SPLIT (default `train`) trains; the dataset's `validation` (or `val`) split validates, else validation
  is carved from the training images as for a folder; `test` is for `mae evaluate` and the speedrun only.
- The image column is the first `datasets.Image` feature (else one named image or img), the label column the first
  `ClassLabel` (else one named label or labels), whose names are the classes; without one the set is unlabeled.
- Images stay encoded in the memory-mapped Arrow table (`Image(decode=False)`: a row is its file's bytes) and are
  decoded by items.Decoded where they are read, in the DataLoader workers, so skipping bad images, the resize,
  the seeded augmentation and the exact resume are the folder's. A worker receives the table by reference to its
  cache files, not a copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import MAEError
from .items import Decoded, short, tensor_cache_dir

VAL_SPLITS = ("validation", "val", "valid")


def is_hub(data: str) -> bool:
    return data.startswith("hf:")


def parse(data: str) -> tuple[str, str]:
    """ "hf:NAME[:SPLIT]" -> (NAME, SPLIT); a NAME with a drive or URL colon keeps it (the last part is a split
    only when it has no slash)."""
    rest = data[3:]
    name, _, split = rest.rpartition(":")
    if not name or "/" in split:
        name, split = rest, ""
    if not name:
        raise MAEError(f"--data {data} names no dataset; use hf:NAME or hf:NAME:SPLIT, e.g. hf:uoft-cs/cifar10")
    return name, split or "train"


def load(data: str):
    """The dataset's splits (a datasets.DatasetDict) and the name of the one that trains, from "hf:NAME[:SPLIT]"."""
    try:
        import datasets
    except ImportError as e:
        raise MAEError(
            f"--data {data} needs the datasets package: pip install 'mae-torch[datasets]' (or pip install datasets)"
        ) from e
    name, split = parse(data)
    try:
        splits = datasets.load_dataset(name)
    except Exception as e:  # no network, no such dataset, a gated one: each its own exception type
        raise MAEError(
            f"could not load the Hub dataset {name} ({short(e)}); check the name, log in for a gated one, or "
            "without network set HF_HUB_OFFLINE=1 with the dataset in the Hub cache"
        ) from e
    if split not in splits:
        raise MAEError(f"the Hub dataset {name} has no split {split!r}; it has {sorted(splits)}: use hf:{name}:SPLIT")
    return splits, split


def hub_splits(data: str) -> dict:
    """{"train": datasets.Dataset, "val": ... or None, "test": ... or None} of "hf:NAME[:SPLIT]"."""
    splits, train = load(data)
    val = next((s for s in VAL_SPLITS if s in splits and s != train), None)
    test = "test" if "test" in splits and train != "test" else None
    return {"train": splits[train], "val": splits[val] if val else None, "test": splits[test] if test else None}


def columns(ds, data: str) -> tuple[str, str | None]:
    """(image column, label column or None) of a datasets.Dataset."""
    import datasets

    feats = ds.features
    image = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    image = image or next((k for k in ("image", "img") if k in feats), None)
    if image is None:
        raise MAEError(f"the Hub dataset {data} has no image column (its columns: {sorted(feats)})")
    label = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((k for k in ("label", "labels") if k in feats), None)
    return image, label


class HubImages(Decoded):
    """Images of one split of a Hub dataset (items.Decoded): item i is row i's image with its class label."""

    def __init__(self, ds, data: str, img_size: int, in_chans: int = 3, crop_pct: float = 1.0, skip_bad=False):
        import datasets

        self.image, label = columns(ds, data)
        self.data, self.split = data, str(ds.split)
        labels = classes = None
        if label is not None:
            feature = ds.features[label]
            try:
                labels = torch.as_tensor(ds[label], dtype=torch.long)
            except (TypeError, ValueError) as e:
                raise MAEError(
                    f"the label column {label!r} of {data} holds no integers; cast it to a ClassLabel "
                    "(datasets' class_encode_column) and save the dataset again"
                ) from e
            if isinstance(feature, datasets.ClassLabel):
                classes = list(feature.names)
            else:
                classes = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
        super().__init__(labels, img_size, in_chans, crop_pct, skip_bad=skip_bad)
        self.classes = classes
        self.rows = ds.select_columns([self.image]).cast_column(self.image, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, j: int) -> bytes:
        cell = self.rows[j][self.image]  # {"bytes": ..., "path": ...}
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            return Path(cell["path"]).read_bytes()
        raise ValueError("the row holds no image")

    def name(self, j: int) -> str:
        return f"image of row {j} of {self.data} ({self.split} split)"

    def cache_key(self) -> str:
        key = f"{self.rows._fingerprint} {self.img_size} {self.mode} {self.crop_pct}"
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def cache_dirs(self) -> list[Path]:
        return [tensor_cache_dir()]
