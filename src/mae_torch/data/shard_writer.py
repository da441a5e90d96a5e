"""`mae shards`: a folder of images (its train/ val/ test/ kept) or CIFAR written as WebDataset-format tar
shards, `OUT/SPLIT-NNNNNN.tar` with timm's `OUT/_info.json`, read back by shards.py.

Design decisions:
- Resumable and byte-deterministic: samples in a seeded order, keys from their index in the source, fixed member
  metadata (mtime 0, uid 0), each shard under a hidden temporary name renamed when complete; a rerun keeps the
  complete shards whose members are the ones it would write, and removes shards a new write no longer makes.
- Images are stored as they are (CIFAR as PNG), or decoded and re-encoded as JPEG at a shorter side (`resize`):
  the usual way to cut the decode cost at scale.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import torch
from PIL import Image

from ..errors import MAEError
from .cifar import cifar, is_cifar
from .folder import check_folder, scan, split_folders
from .items import short


def source_splits(src: str, data_root: str | None) -> tuple[dict, list[str] | None]:
    """{split: (items, labels or None)} of a folder (its train/ val/ test/ kept, else one train split) or of
    CIFAR (train, test); items are image paths, or a uint8 (N, C, H, W) tensor for CIFAR. And the classes."""
    if is_cifar(src):
        parts = {s: cifar(src, data_root, s == "train", 32) for s in ("train", "test")}
        return {s: (ds.images, ds.labels.tolist()) for s, (ds, _) in parts.items()}, parts["train"][1]
    train, val, test = split_folders(check_folder(src))
    splits, classes = {}, None
    for split, root in (("train", train), ("val", val), ("test", test)):
        if root is None:
            continue
        paths, labels, found = scan(root)
        if split == "train":
            classes = found
        elif (found is None) != (classes is None) or not set(found or []) <= set(classes or []):
            raise MAEError(
                f"the classes of {root} ({found}) differ from those of {train} ({classes}); give {split}/ the "
                "same <class>/ subfolders as train/"
            )
        if found is not None:  # the training split's numbering
            number = {c: k for k, c in enumerate(classes)}
            labels = [number[found[y]] for y in labels]
        splits[split] = (paths, labels)
    return splits, classes


def write_shards(splits: dict, classes: list[str] | None, out: str, shard_size: int, resize: int, seed: int) -> dict:
    """Write OUT/SPLIT-NNNNNN.tar (shard_size samples each, in a seeded order) and OUT/_info.json; returns the
    info. resize > 0: images re-encoded as JPEG at that shorter side, else stored as they are (CIFAR as PNG)."""
    if shard_size < 1:
        raise MAEError(f"--shard-size must be at least 1, got {shard_size}")
    folder = Path(os.path.expanduser(out))
    folder.mkdir(parents=True, exist_ok=True)
    info: dict = {"classes": classes, "splits": {}}
    for split, (items, labels) in splits.items():
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        chunks = [order[i : i + shard_size] for i in range(0, len(order), shard_size)]
        names = [f"{split}-{s:06d}.tar" for s in range(len(chunks))]
        for name, chunk in zip(names, chunks):
            write_shard(folder / name, [(i, items[i], None if labels is None else labels[i]) for i in chunk], resize)
        for old in folder.glob(f"{split}-*.tar"):  # a previous write's extra shards would be read as data
            if re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", old.name) and old.name not in names:
                old.unlink()
        lengths = [len(c) for c in chunks]
        info["splits"][split] = {"name": split, "num_samples": len(order), "shard_lengths": lengths, "filenames": names}
    atomic_write(folder / "_info.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    return info


def write_shard(path: Path, samples: list[tuple[int, object, int | None]], resize: int) -> None:
    """One shard of (index in the source, image path or uint8 (C, H, W) tensor, label or None) samples."""
    members = [(f"{i:08d}", ext_of(item, resize), label) for i, item, label in samples]
    want = [f"{key}.{e}" for key, ext, label in members for e in (ext, "cls")[: 1 if label is None else 2]]
    try:
        with tarfile.open(path) as tar:
            if tar.getnames() == want:  # complete (it has its final name) and of this write: kept
                return
    except (tarfile.TarError, EOFError, OSError):
        pass

    def fill(f) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for (key, ext, label), (_, item, _) in zip(members, samples):
                add(tar, f"{key}.{ext}", encode(item, resize))
                if label is not None:
                    add(tar, f"{key}.cls", str(label).encode())

    atomic_write(path, fill)


def atomic_write(path: Path, fill) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: readers never list it
    with open(tmp, "wb") as f:
        fill(f)
    tmp.replace(path)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)  # mtime 0, uid/gid 0, no user names: the same bytes on every write
    member.size, member.mode = len(data), 0o644
    tar.addfile(member, io.BytesIO(data))


def ext_of(item, resize: int) -> str:
    ext = "jpg" if resize else item.rpartition(".")[2].lower() if isinstance(item, str) else "png"
    return "jpg" if ext == "jpeg" else ext


def encode(item, resize: int) -> bytes:
    """The member's bytes: the file as it is, or decoded, shorter side resized (bicubic) and saved as JPEG 95."""
    if isinstance(item, str) and not resize:
        return Path(item).read_bytes()
    try:
        if isinstance(item, str):  # re-encoded: resize > 0
            with Image.open(item) as f:
                im = f.convert("RGB")
        else:
            im = Image.fromarray(item.permute(1, 2, 0).numpy())  # (H, W, C)
        if resize:
            scale = resize / min(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, **({"format": "JPEG", "quality": 95} if resize else {"format": "PNG"}))
    except (OSError, ValueError, SyntaxError) as e:
        raise MAEError(f"cannot read image {item}: {short(e)}; remove or replace it") from e
    return buf.getvalue()
