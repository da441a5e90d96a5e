"""What every source yields: item i -> (uint8 image (C, H, W), label int), label -1 when unlabeled.

Design decisions:
- Normalisation and augmentation happen later (on the device, batched, or in the streaming path's workers), so
  items stay cheap and the same data serves every stage. Every dataset has a `labels` attribute (list or
  tensor of int, or None): None means unlabeled, fine for pretraining and an error for fine-tuning.
- `Decoded` is the one place images are decoded, whatever holds their bytes (a folder's files, tar shards): a
  source says how to read item j's bytes and what to call it in an error, and how its decode is cached
  (`cache_key`, `cache_dirs`, read by memory.py); the skip-and-count of unreadable images and the resize to
  img_size live here once. `groups` (None, or the file of each item) tells the streaming path which items share
  a file.
- Two decoders, by what follows them. The resize to img_size (evaluation, the decode cached for the device path)
  is PIL's, as it always was. The streaming path's training transform works on uint8 tensors: torchvision's
  decoder (libjpeg-turbo, as PIL's, the same pixels) hands it a (C, H, W) tensor without PIL's copies, and the
  crop's bicubic resize runs in PyTorch's vectorised uint8 kernel (docs/benchmarks.md: 1.7x the images per
  worker); formats or depths torchvision does not decode to 8 bits (16-bit PNG, BMP, TIFF) go through PIL.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import MAEError

try:  # deprecated by torchvision 0.29 for TorchCodec's; where gone, PIL's decoder takes over (the same pixels)
    from torchvision.io import ImageReadMode, decode_image

    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
except ImportError:
    decode_image = None


class Decoded(Dataset):
    """Images decoded on read: item i -> (uint8 tensor (C, H, W), label int; -1 when unlabeled).

    Without a `transform`, an image of another size keeps its aspect ratio: its shorter side is resized
    (bicubic) to img_size / crop_pct and the centre img_size square is cut out (crop_pct 1: the largest
    centred square; ImageNet evaluation: 0.875). A `transform` (uint8 tensor (C, H, W) -> uint8 tensor of
    img_size square) replaces that, e.g. the streaming path's random resized crop of the original image. An
    image that does not decode is an error naming it, or with `skip_bad` is replaced by the next readable one
    and counted in `skipped` (shared with DataLoader workers). Subclasses give `__len__`, `read`, `name`,
    `cache_key` and `cache_dirs`.
    """

    groups: torch.Tensor | None = None  # the file of each item where items share files (tar shards)

    def __init__(
        self,
        labels: list[int] | torch.Tensor | None,
        img_size: int,
        in_chans: int = 3,
        crop_pct: float = 1.0,
        transform=None,
        skip_bad: bool = False,
    ):
        self.labels, self.img_size = labels, img_size
        self.in_chans, self.mode = in_chans, {3: "RGB", 1: "L"}[in_chans]
        self.crop_pct, self.transform, self.skip_bad = crop_pct, transform, skip_bad
        self.skipped = torch.zeros((), dtype=torch.long).share_memory_()

    def read(self, j: int) -> bytes:
        """Item j's encoded image (a file's bytes)."""
        raise NotImplementedError

    def name(self, j: int) -> str:
        """Item j as an error names it: "image PATH", "MEMBER in shard PATH"."""
        raise NotImplementedError

    def cache_key(self) -> str:
        """A short key that changes whenever the decoded tensor of this source would."""
        raise NotImplementedError

    def cache_dirs(self) -> list[Path]:
        """Where the decoded tensor may be cached, in order of preference."""
        raise NotImplementedError

    def open(self, j: int) -> Image.Image:
        """Item j's image, opened (PIL raises OSError, ValueError or SyntaxError for a corrupt one)."""
        return Image.open(io.BytesIO(self.read(j)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        for j in range(i, i + n):  # the next readable image stands in for a bad one (skip_bad)
            try:
                x = self.load(j % n)
                break
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for corrupt files
                if not self.skip_bad:
                    raise MAEError(f"cannot read {self.name(j % n)}: {short(e)}; remove or replace it") from e
                self.skipped += 1
                print(f"warning: skipped unreadable {self.name(j % n)}: {short(e)}", file=sys.stderr)
        else:
            raise MAEError(f"no image of the {n} in this split decodes; check the data")
        return x, -1 if self.labels is None else int(self.labels[j % n])

    def load(self, j: int) -> torch.Tensor:
        """Item j as uint8 (C, H, W): through the transform, else resized to img_size and centre-cropped."""
        if self.transform is not None:
            return self.transform(self.decode_tensor(j)).contiguous()
        return as_tensor(self.decode(j))

    def decode_tensor(self, j: int) -> torch.Tensor:
        """Item j at its own size as uint8 (C, H, W): torchvision's decoder, else PIL's (errors are PIL's)."""
        data = self.read(j)
        if decode_image is not None:
            mode = ImageReadMode.RGB if self.mode == "RGB" else ImageReadMode.GRAY
            try:
                x = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
                if x.dtype == torch.uint8:
                    return x  # (C, H, W), channels-last strides: what the uint8 resize kernel reads
            except RuntimeError:
                pass  # not a format torchvision decodes, or damaged: PIL decodes it or names the damage
        return as_tensor(self.convert(Image.open(io.BytesIO(data))))

    def convert(self, im: Image.Image) -> Image.Image:
        """An opened image, loaded and in this source's mode (RGB or L)."""
        with im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            if im.mode.startswith("I"):  # 16-bit (or 32-bit) greyscale: PIL's convert would clip at 255
                wide = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((wide * 255 / max(wide.max(), 1) if wide.max() > 255 else wide).astype(np.uint8))
            if im.mode == self.mode:
                im.load()  # read before the file closes; convert would copy the whole image for nothing
                return im
            return im.convert(self.mode)

    def decode(self, j: int) -> Image.Image:
        """Item j resized to img_size / crop_pct at its shorter side, the centre img_size square (PIL, bicubic)."""
        im = self.convert(self.open(j))
        s = self.img_size
        if im.size == (s, s):
            return im
        w, h = im.size
        scale = s / self.crop_pct / min(w, h)
        im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        return im.crop((left, top, left + s, top + s))


def as_tensor(im: Image.Image) -> torch.Tensor:
    """A PIL image (RGB or L) as uint8 (C, H, W)."""
    x = torch.from_numpy(np.array(im, dtype=np.uint8))  # (H, W, C) or (H, W) for "L"
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


class TensorImages(Dataset):
    """Images already in memory (torchvision CIFAR, a decoded cache): item i -> (uint8 (C,H,W), label int)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], -1 if self.labels is None else int(self.labels[i])


def default_data_root() -> str:
    """Where CIFAR is downloaded when --data-root is not given: $XDG_CACHE_HOME/mae-torch/data."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mae-torch", "data")


def tensor_cache_dir() -> Path:
    """The decoded-tensor cache for sources whose own folder is read-only: ~/.cache/mae-torch/tensors."""
    return Path(default_data_root()).parent / "tensors"


def short(e: BaseException) -> str:
    """An exception as one short line: messages are printed on one line by the CLI."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:117] + '...' if len(text) > 120 else text}"
