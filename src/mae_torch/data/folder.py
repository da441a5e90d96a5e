"""A folder of images: the ImageFolder layout (`PATH/<class>/*.png`) is labeled, anything else with images in it
is an unlabeled set. File order is sorted, so indices and splits are reproducible; nothing is decoded when a
folder is listed (listing 1.28M files is the whole start-up cost)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import MAEError
from .items import Decoded, tensor_cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFiles(Decoded):
    """Images read lazily from files (items.Decoded): item i is paths[i] with labels[i]."""

    def __init__(
        self,
        paths: list[str],
        labels: list[int] | None,
        img_size: int,
        in_chans: int = 3,
        crop_pct: float = 1.0,
        transform=None,
        skip_bad: bool = False,
    ):
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        super().__init__(labels, img_size, in_chans, crop_pct, transform, skip_bad)
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, j: int) -> bytes:
        with open(self.paths[j], "rb") as f:
            return f.read()

    def name(self, j: int) -> str:
        return f"image {self.paths[j]}"

    def cache_key(self) -> str:
        """Every file's path, size and modification time and the decode settings (one stat per file, no read),
        so editing, adding or removing an image makes a new key."""
        h = hashlib.sha1(json.dumps([self.img_size, self.mode, self.crop_pct, self.paths]).encode())
        for p in self.paths:
            st = os.stat(p)
            h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def cache_dirs(self) -> list[Path]:
        beside = Path(os.path.commonpath([os.path.dirname(p) for p in self.paths])) / ".mae-cache"
        return [beside, tensor_cache_dir()]


def list_images(paths: list[str]) -> list[str]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    found: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found += images_below(p)
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise MAEError(f"image path not found: {p}; pass image files or folders of images")
    if not found:
        raise MAEError(f"no images in {' '.join(paths)} (accepted: {' '.join(IMAGE_EXTENSIONS)})")
    return found


def check_folder(data: str) -> str:
    path = os.path.expanduser(data)
    if not os.path.exists(path):
        raise MAEError(f"data folder not found: {path}; pass an existing folder of images or cifar10/cifar100")
    if not os.path.isdir(path):
        raise MAEError(
            f"--data {path} is a file, not a folder; pass a folder of images (PATH/<class>/*.png) or cifar10/cifar100"
        )
    return path


def split_folders(path: str, need_train: bool = True) -> tuple[str | None, str | None, str | None]:
    """(the training images' folder, PATH/val or None, PATH/test or None) of a data folder: PATH/train when it
    exists, else PATH itself. val/ or test/ without train/ is an error when training (they would silently become
    classes), and for evaluation alone (need_train False) a folder with no training split (None)."""
    train = os.path.join(path, "train")
    val, test = (p if os.path.isdir(p) else None for p in (os.path.join(path, s) for s in ("val", "test")))
    if os.path.isdir(train):
        return train, val, test
    if not (val or test):
        return path, None, None
    if need_train:
        name = "val" if val else "test"
        raise MAEError(f"{path} has {name}/ but no train/; put the training images in {path}/train")
    return None, val, test


def visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)  # by extension only: decoding every file would be slow


def is_image(path: str) -> bool:
    return os.path.isfile(path) and is_image_name(path)


def images_below(root: str) -> list[str]:
    """All image files under `root` at any depth, hidden files and folders skipped, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = visible(dirnames)  # prune hidden folders in place, as os.walk allows
        found += [os.path.join(dirpath, f) for f in visible(filenames) if is_image_name(f)]
    return sorted(found)


def scan(root: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """Image paths under `root`, their labels and class names; labels and classes are None if unlabeled.

    Labeled (ImageFolder) means: no images directly in `root`, and subfolders holding images directly.
    """
    entries = [os.path.join(root, n) for n in visible(os.listdir(root))]
    classes = []
    if not any(is_image(e) for e in entries):
        for d in entries:
            if os.path.isdir(d) and any(is_image(os.path.join(d, n)) for n in visible(os.listdir(d))):
                classes.append(os.path.basename(d))
    if not classes:
        paths = images_below(root)
        if not paths:
            raise MAEError(
                f"no images found in {root}; add image files ({', '.join(IMAGE_EXTENSIONS)}), "
                "directly or in <class>/ subfolders"
            )
        return paths, None, None
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = images_below(os.path.join(root, name))
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def folder_images(root: str, img_size: int, in_chans: int = 3, crop_pct: float = 1.0, skip_bad: bool = False):
    """(ImageFiles of the images under `root`, class names or None)."""
    paths, labels, classes = scan(root)
    return ImageFiles(paths, labels, img_size, in_chans, crop_pct, skip_bad=skip_bad), classes
