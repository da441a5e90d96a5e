"""Datasets: CIFAR-10/100 through torchvision, or any local folder of images.

Design decisions:
- Items are `(uint8 image (C, H, W), label int)`, label -1 when unlabeled. Normalisation and augmentation
  happen later (on the device, batched), so datasets stay cheap and the same data serves every stage.
- Every dataset has a `labels` attribute (list or tensor of int, or None): None means unlabeled, which is
  fine for pretraining and an error for fine-tuning.
- A folder is labeled when it follows the ImageFolder layout (`PATH/<class>/*.png`); anything else with
  images in it is an unlabeled set. File order is sorted, so indices and splits are reproducible.
- Validation never sees test data: it comes from `PATH/val`, or is carved from the training images
  (stratified by class, seeded). `PATH/test` and CIFAR's test split belong to `build_eval_dataset` only,
  so choosing the best epoch cannot leak the numbers we report. Data without a test split can set one aside:
  `test_fraction` holds out a stratified part of the training images, by a fixed seed (the same images
  whatever `--seed`), before validation is carved; training never sees it and `build_eval_dataset` returns it.
- CIFAR lives in memory as one uint8 tensor (150 MB for 50k images at 32x32), resized once up front.
"""

import copy
import os
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from mae_torch.errors import MAEError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# name -> (display name, the archive torchvision looks for in its root before downloading)
_CIFAR = {
    "cifar10": ("CIFAR-10", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR-100", "cifar-100-python.tar.gz"),
}


class ImageFiles(Dataset):
    """Images read lazily from files: item i -> (uint8 tensor (C, H, W), label int; -1 when unlabeled).

    Without a `transform`, an image of another size keeps its aspect ratio: its shorter side is resized
    (bicubic) to img_size / crop_pct and the centre img_size square is cut out (crop_pct 1: the largest
    centred square; ImageNet evaluation: 0.875). A `transform` (PIL -> PIL of img_size square) replaces that,
    e.g. the streaming path's random resized crop of the original image. A file that does not decode is an
    error naming it, or with `skip_bad` is replaced by the next readable file and counted in `skipped`
    (shared with DataLoader workers).
    """

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
        self.paths, self.labels, self.img_size = list(paths), labels, img_size
        self.in_chans, self.mode = in_chans, {3: "RGB", 1: "L"}[in_chans]
        self.crop_pct, self.transform, self.skip_bad = crop_pct, transform, skip_bad
        self.skipped = torch.zeros((), dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for j in range(i, i + len(self.paths)):  # the next readable file stands in for a bad one (skip_bad)
            path = self.paths[j % len(self.paths)]
            try:
                im = self.decode(path)
                break
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for corrupt files
                if not self.skip_bad:
                    raise MAEError(f"cannot read image {path}: {_short(e)}; remove or replace it") from e
                self.skipped += 1
                print(f"warning: skipped unreadable image {path}: {_short(e)}", file=sys.stderr)
        else:
            raise MAEError(f"no image of the {len(self.paths)} in this split decodes; check the data")
        arr = np.array(im, dtype=np.uint8)  # (H, W, C) or (H, W) for "L"
        x = torch.from_numpy(arr)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()  # (C, H, W)
        return x, -1 if self.labels is None else int(self.labels[j % len(self.paths)])

    def decode(self, path: str) -> Image.Image:
        with Image.open(path) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            if im.mode.startswith("I"):  # 16-bit (or 32-bit) greyscale: PIL's convert would clip at 255
                wide = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((wide * 255 / max(wide.max(), 1) if wide.max() > 255 else wide).astype(np.uint8))
            im = im.convert(self.mode)
        if self.transform is not None:
            return self.transform(im)
        s = self.img_size
        if im.size == (s, s):
            return im
        w, h = im.size
        scale = s / self.crop_pct / min(w, h)
        im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        return im.crop((left, top, left + s, top + s))


class TensorImages(Dataset):
    """Images already in memory (torchvision CIFAR): item i -> (uint8 (C,H,W), label int)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], -1 if self.labels is None else int(self.labels[i])


HOLDOUT_SEED = 20_211_111  # the test_fraction carve's: fixed, so every seed and stage holds out the same images


class _Split(Subset):
    """A Subset that keeps the `labels` attribute, so callers can still tell labeled from unlabeled. A split of
    a split indexes the base dataset directly (files_of and the device path see one level)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        if isinstance(dataset, _Split):
            dataset, indices = dataset.dataset, [dataset.indices[i] for i in indices]
        super().__init__(dataset, indices)
        parent = dataset.labels
        if parent is None:
            self.labels = None
        elif isinstance(parent, torch.Tensor):
            self.labels = parent[torch.tensor(indices, dtype=torch.long)]
        else:
            self.labels = [parent[i] for i in indices]


def files_of(ds: Dataset) -> ImageFiles | None:
    """The ImageFiles under a split (or the dataset itself), else None."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    return base if isinstance(base, ImageFiles) else None


def with_files(ds: Dataset, **settings) -> Dataset:
    """The same split of a copy of its ImageFiles with other settings (transform, crop_pct) and its own count
    of skipped files: the training and validation splits of one folder decode differently when streaming."""
    files = copy.copy(files_of(ds))
    for k, v in settings.items():
        setattr(files, k, v)
    files.skipped = torch.zeros((), dtype=torch.long).share_memory_()
    return _Split(files, ds.indices) if isinstance(ds, Subset) else files


def list_images(paths: list[str]) -> list[str]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    found: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found += _images_below(p)
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise MAEError(f"image path not found: {p}; pass image files or folders of images")
    if not found:
        raise MAEError(f"no images in {' '.join(paths)} (accepted: {' '.join(IMAGE_EXTENSIONS)})")
    return found


def default_data_root() -> str:
    """Where CIFAR is downloaded when --data-root is not given: $XDG_CACHE_HOME/mae-torch/data."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mae-torch", "data")


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
    train, classes, train_root, val_root = _training_images(data, data_root, img_size, in_chans, skip_bad)
    if need_labels:
        _require_labels(train_root, classes)
    train = _hold_out(train, test_fraction, train_root)[0]
    if val_root is None:
        return (*_carve(train, val_fraction, seed, train_root), classes)
    val_paths, val_labels, val_classes = _scan(val_root)
    if classes is None:
        val_labels = None  # an unlabeled train set makes the whole run unlabeled
    elif val_classes != classes:
        missing = sorted(set(classes) - set(val_classes or []))
        extra = sorted(set(val_classes or []) - set(classes))
        raise MAEError(
            f"class folders of {val_root} differ from {train_root}: missing in val {missing}, "
            f"only in val {extra}; give val/ the same <class>/ subfolders as train/"
        )
    return train, ImageFiles(val_paths, val_labels, img_size, in_chans, skip_bad=skip_bad), classes


def _training_images(data: str, data_root: str | None, img_size: int, in_chans: int, skip_bad: bool, crop_pct=1.0):
    """(all training images, class names, where they are, the val/ folder beside them or None)."""
    if data.lower() in _CIFAR:
        train, classes = _cifar(data.lower(), data_root, True, img_size, in_chans)  # val from TRAIN, not test
        return train, classes, data, None
    path = _check_folder(data)
    train_root = os.path.join(path, "train")
    if not os.path.isdir(train_root):
        for name in ("val", "test"):  # otherwise they would silently become classes, and test would leak
            if os.path.isdir(os.path.join(path, name)):
                raise MAEError(f"{path} has {name}/ but no train/; put the training images in {path}/train")
        train_root = path
    paths, labels, classes = _scan(train_root)
    val_root = os.path.join(path, "val")
    val_root = val_root if train_root != path and os.path.isdir(val_root) else None
    return ImageFiles(paths, labels, img_size, in_chans, crop_pct, skip_bad=skip_bad), classes, train_root, val_root


def _hold_out(ds: Dataset, fraction: float, where: str) -> tuple[Dataset, Dataset | None]:
    """(the rest, the held-out test part) of the training images: `fraction` of each class, by HOLDOUT_SEED."""
    if not 0 <= fraction < 1:
        raise MAEError(f"test_fraction must be in [0, 1), got {fraction}; use e.g. 0.1")
    return _carve(ds, fraction, HOLDOUT_SEED, where) if fraction > 0 else (ds, None)


def has_test_split(data: str) -> bool:
    """Whether `data` has a test split of its own: CIFAR's, or a folder's test/."""
    return data.lower() in _CIFAR or os.path.isdir(os.path.join(os.path.expanduser(data), "test"))


def build_eval_dataset(
    data: str,
    *,
    data_root: str | None,
    img_size: int,
    in_chans: int = 3,
    crop_pct: float = 1.0,
    test_fraction: float = 0.0,
) -> tuple[Dataset, list[str]]:
    """The labeled split to evaluate on (CIFAR's test split, or a folder) and its class names; folder images
    of another size are resized to img_size / crop_pct (shorter side) and centre-cropped. test_fraction > 0:
    the training images that `build_datasets` held out with the same fraction."""
    if test_fraction > 0:
        train, classes, root, _ = _training_images(data, data_root, img_size, in_chans, False, crop_pct)
        _require_labels(root, classes, min_classes=1)
        return _hold_out(train, test_fraction, root)[1], classes
    if data.lower() in _CIFAR:
        return _cifar(data.lower(), data_root, False, img_size, in_chans)
    path = _check_folder(data)
    root = next((os.path.join(path, s) for s in ("test", "val") if os.path.isdir(os.path.join(path, s))), path)
    paths, labels, classes = _scan(root)
    _require_labels(root, classes, min_classes=1)  # evaluating on a subset of the classes is fine
    return ImageFiles(paths, labels, img_size, in_chans, crop_pct), classes


def _short(e: BaseException) -> str:
    """An exception as one short line: messages are printed on one line by the CLI."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:117] + '...' if len(text) > 120 else text}"


def _cifar(name: str, data_root: str | None, train: bool, img_size: int, in_chans: int):
    """CIFAR split as in-memory TensorImages (uint8 (N, C, img_size, img_size)) and its class names."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    title, archive = _CIFAR[name]
    root = os.path.expanduser(data_root) if data_root else default_data_root()
    try:
        ds = cls(root=root, train=train, download=True)
    except Exception as e:  # no network surfaces as URLError, OSError or RuntimeError, depending on where
        raise MAEError(
            f"could not download {title} into {root} ({_short(e)}); without network, pass a local "
            "image folder with --data PATH (ImageFolder layout: PATH/<class>/*.png), "
            f"or put the torchvision archive {archive} in --data-root"
        ) from e
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    if img_size != images.shape[-1]:
        images = torch.cat([_resize(chunk, img_size) for chunk in images.split(1024)])  # bounded float memory
    if in_chans == 1:
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        images = rgb_to_grayscale(images)  # (N, 1, H, W) uint8
    return TensorImages(images, torch.tensor(ds.targets, dtype=torch.long)), list(ds.classes)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, size, size), bicubic with antialiasing like PIL's resize."""
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def _check_folder(data: str) -> str:
    path = os.path.expanduser(data)
    if not os.path.exists(path):
        raise MAEError(f"data folder not found: {path}; pass an existing folder of images or cifar10/cifar100")
    if not os.path.isdir(path):
        raise MAEError(
            f"--data {path} is a file, not a folder; pass a folder of images (PATH/<class>/*.png) or cifar10/cifar100"
        )
    return path


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)  # by extension only: decoding every file would be slow


def _is_image(path: str) -> bool:
    return os.path.isfile(path) and _is_image_name(path)


def _images_below(root: str) -> list[str]:
    """All image files under `root` at any depth, hidden files and folders skipped, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = _visible(dirnames)  # prune hidden folders in place, as os.walk allows
        found += [os.path.join(dirpath, f) for f in _visible(filenames) if _is_image_name(f)]
    return sorted(found)


def _scan(root: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """Image paths under `root`, their labels and class names; labels and classes are None if unlabeled.

    Labeled (ImageFolder) means: no images directly in `root`, and subfolders holding images directly.
    """
    entries = [os.path.join(root, n) for n in _visible(os.listdir(root))]
    classes = []
    if not any(_is_image(e) for e in entries):
        for d in entries:
            if os.path.isdir(d) and any(_is_image(os.path.join(d, n)) for n in _visible(os.listdir(d))):
                classes.append(os.path.basename(d))
    if not classes:
        paths = _images_below(root)
        if not paths:
            raise MAEError(
                f"no images found in {root}; add image files ({', '.join(IMAGE_EXTENSIONS)}), "
                "directly or in <class>/ subfolders"
            )
        return paths, None, None
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = _images_below(os.path.join(root, name))
        paths += found
        labels += [label] * len(found)
    return paths, labels, classes


def _require_labels(root: str, classes: list[str] | None, min_classes: int = 2) -> None:
    if classes is None:
        raise MAEError(
            f"{root} has no class subfolders, so it is unlabeled: fine-tuning needs {root}/<class>/image "
            "files; an unlabeled folder is valid for pretraining only"
        )
    if len(classes) < min_classes:
        raise MAEError(f"{root} has only the class folder {classes}; classification needs at least 2 classes")


def _carve(ds: Dataset, val_fraction: float, seed: int, where: str) -> tuple[Dataset, Dataset]:
    """Hold out round(val_fraction * n) items per class (all items if unlabeled), seeded and stratified.

    Each group with 2+ items gives at least 1 to validation and keeps at least 1 for training.
    val_fraction == 0 gives an empty validation split on purpose (the user asked for none).
    """
    labels = [0] * len(ds) if ds.labels is None else [int(v) for v in ds.labels]
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    g = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for y in sorted(groups):
        idx = groups[y]
        # a group's last image stays in training: a class with no training images cannot be learned
        k = min(max(round(val_fraction * len(idx)), 1), len(idx) - 1) if val_fraction > 0 else 0
        val += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    if val_fraction > 0 and not val:
        raise MAEError(
            f"{where} is too small to hold out validation images ({len(ds)} images); add images or provide PATH/val"
        )
    held = set(val)
    return _Split(ds, [i for i in range(len(ds)) if i not in held]), _Split(ds, sorted(val))


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
    return _Split(ds, sorted(keep))
