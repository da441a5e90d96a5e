"""WebDataset-format tar shards as a source (`ShardSamples`): split by file names, indexed once, read by offset.

Design decisions:
- A sample is the members of a shard sharing a key (the name up to the first "." after the last "/", as in
  webdataset): one image (`KEY.jpg|jpeg|png|webp|...`), its label in `KEY.cls` (an int as text) or `KEY.json`
  (`{"label": int}`). Plain uncompressed tars: the webdataset package reads ours, we read its ShardWriter's.
- Random access, not a stream: each shard is scanned once into an index (shard, byte offset and size of the image
  member, label), cached as safetensors (no pickle) in `.mae-cache/` beside the shards, keyed by every shard's
  path, size and modification time; item j is one seek and read. `groups` (the shard of each item) lets the
  streaming path read a few shards at a time; the index is plain tensors, cheap to hand to DataLoader workers,
  which open the file by path on each read.
- Damage is found when the index is built, not mid-epoch: a truncated or corrupt tar (a member running past the
  file's end, a header that does not parse, no end-of-archive block), a shard without image samples, or a count
  that differs from timm's `_info.json` or OpenCLIP's `sizes.json` is a one-line error naming the shard; with
  skip_bad a warning, keeping what was read before the damage (less the sample that may have lost members).
- Writing them (`mae shards`) is shard_writer.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MAEError
from .folder import IMAGE_EXTENSIONS
from .items import Decoded, short, tensor_cache_dir

IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
LABEL_KEYS = ("label", "cls", "class", "target")  # where a KEY.json may keep the class index
SPLIT_WORD = re.compile(r"(?:^|[-_.])(train|val|test)")  # train*, val*/validation*, test*; also imagenet-train-*
INDEX_VERSION = 1  # bump when the cached index's layout changes


def expand_braces(pattern: str) -> list[str]:
    """Bash-like brace expansion: `{000..002}` (zero-padded as written), `{a,b}`; several groups multiply."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    if r := re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body):
        a, b = r.groups()
        width = max(len(a), len(b)) if re.match(r"-?0\d", a) or re.match(r"-?0\d", b) else 0
        step = 1 if int(b) >= int(a) else -1
        options = [f"{i:0{width}d}" for i in range(int(a), int(b) + step, step)]
    else:
        options = body.split(",") if "," in body else ["{" + body + "}"]  # no comma: a literal, as in bash
    return [head + o + rest for o in options for rest in expand_braces(tail)]


def shard_splits(data: str, need_train: bool = True) -> dict[str, list[str]]:
    """{"train", "val", "test": sorted shard paths} of a folder of shards, one .tar file or a brace pattern; a
    folder without training shards is an error when training (need_train)."""
    path = os.path.expanduser(data)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    if os.path.isdir(path):
        for name in sorted(n for n in os.listdir(path) if n.endswith(".tar") and not n.startswith(".")):
            m = SPLIT_WORD.search(name.lower())
            splits[m.group(1) if m else "train"].append(os.path.join(path, name))
        if need_train and not splits["train"]:
            raise MAEError(f"{path} has val or test shards but no training shards; name those train-NNNNNN.tar")
        return splits
    names = expand_braces(path)
    splits["train"] = sorted(p for p in names if os.path.isfile(p) and not os.path.basename(p).startswith("."))
    if not splits["train"]:
        raise MAEError(
            f"no shard matches {data} ({len(names)} names, from {names[0]}); pass an existing folder of .tar "
            "shards or a brace pattern of existing files, e.g. 'DIR/train-{000000..000127}.tar'"
        )
    return splits


class ShardSamples(Decoded):
    """The image samples of tar shards (items.Decoded), indexed once: item i is the image at `offset[i]` in
    shard `paths[shard[i]]`, labeled `labels[i]` (None when no sample has a label)."""

    def __init__(
        self,
        paths: list[str],
        img_size: int,
        in_chans: int = 3,
        crop_pct: float = 1.0,
        transform=None,
        skip_bad: bool = False,
    ):
        if not paths:
            raise MAEError("no shards to read; pass a folder of .tar shards or a brace pattern of them")
        self.paths = [str(p) for p in paths]
        self.root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in self.paths])
        index, damaged = read_index(self.paths, self.cache_dirs(), skip_bad)
        self.shard, self.offset, self.size = index["shard"], index["offset"], index["size"]  # (N,) each
        self.names, self.name_start = index["names"], index["name_start"]  # NUL-ended member names, (N + 1,)
        check_counts(self.paths, torch.bincount(self.shard, minlength=len(self.paths)).tolist(), damaged, skip_bad)
        labels, self.classes = self.labels_and_classes(index["label"])
        super().__init__(labels, img_size, in_chans, crop_pct, transform, skip_bad)
        self.groups = self.shard

    def labels_and_classes(self, label: torch.Tensor) -> tuple[torch.Tensor | None, list[str] | None]:
        has = label >= 0
        if not has.any():
            return None, None
        if not has.all():
            j = int((~has).nonzero()[0])
            raise MAEError(
                f"{int(has.sum())} of the {len(label)} samples in the shards {self.root} carry a label and the "
                f"others do not ({self.name(j)} has none); give every sample a KEY.cls or KEY.json label, or none"
            )
        top = int(label.max())
        info = read_json(os.path.join(self.root, "_info.json")) or {}
        classes = list(info.get("classes") or [str(i) for i in range(top + 1)])
        if top >= len(classes):
            raise MAEError(
                f"the shards {self.root} have label {top}, but their _info.json names {len(classes)} classes; "
                "fix its classes list or the labels"
            )
        return label, classes

    def __len__(self) -> int:
        return len(self.shard)

    def read(self, j: int) -> bytes:
        with open(self.paths[int(self.shard[j])], "rb") as f:  # by path: a worker holds no open files
            f.seek(int(self.offset[j]))
            return f.read(int(self.size[j]))

    def name(self, j: int) -> str:
        a, b = int(self.name_start[j]), int(self.name_start[j + 1]) - 1
        return f"{self.names[a:b].numpy().tobytes().decode()} in shard {self.paths[int(self.shard[j])]}"

    def cache_key(self) -> str:
        """The shards' paths, sizes and modification times and the decode settings (no shard read)."""
        h = hashlib.sha1(json.dumps([self.img_size, self.mode, self.crop_pct, len(self), self.paths]).encode())
        for p in self.paths:
            h.update(f"{' '.join(map(str, stat(p)))}\n".encode())
        return h.hexdigest()[:16]

    def cache_dirs(self) -> list[Path]:
        """Where the index and the decoded tensor are cached: beside the shards, else ~/.cache/mae-torch."""
        return [Path(self.root) / ".mae-cache", tensor_cache_dir()]


def stat(path: str) -> tuple[int, int]:
    return (st := os.stat(path)).st_size, st.st_mtime_ns


def read_index(paths: list[str], dirs: list[Path], skip_bad: bool) -> tuple[dict[str, torch.Tensor], set[int]]:
    """The index of `paths` (cached) and the shards found damaged (an index with damage is not cached)."""
    stats = [(os.path.abspath(p), *stat(p)) for p in paths]
    name = f"shards-{hashlib.sha1(json.dumps([INDEX_VERSION, stats]).encode()).hexdigest()[:16]}.safetensors"
    for d in dirs:
        if (d / name).is_file():
            return load_file(str(d / name)), set()
    rows, names, damaged = [], [], set()
    for s, p in enumerate(paths):
        samples, whole = scan_shard(p, skip_bad)
        if whole and not samples:
            problem(f"shard {p} holds no image samples (KEY.jpg, KEY.png, ...); remove it or rewrite it", skip_bad)
        if not whole or not samples:
            damaged.add(s)
        rows += [(s, offset, size, label) for _, offset, size, label in samples]
        names += [member.encode() + b"\0" for member, *_ in samples]
    if not rows:
        raise MAEError(f"the shards {os.path.dirname(paths[0])} hold no readable image samples; check them")
    t = torch.tensor(rows, dtype=torch.long)  # (N, 4)
    joined = b"".join(names)
    index = {
        **{k: t[:, i].contiguous() for i, k in enumerate(("shard", "offset", "size", "label"))},
        "names": torch.frombuffer(bytearray(joined), dtype=torch.uint8),
        "name_start": torch.tensor([0, *map(len, names)], dtype=torch.long).cumsum(0),
    }
    if not damaged:
        save_cached(index, dirs, name)
    return index, damaged


def save_cached(tensors: dict[str, torch.Tensor], dirs: list[Path], name: str) -> None:
    for d in dirs:  # the first writable folder; caching is only a shortcut, so none writable is fine
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{name}.{os.getpid()}.tmp"  # processes of one torchrun may race here
            save_file(tensors, str(tmp))
            tmp.replace(d / name)
            return
        except OSError:
            continue


def scan_shard(path: str, skip_bad: bool) -> tuple[list[tuple[str, int, int, int]], bool]:
    """The image samples of one shard as (member name, data offset, size, label or -1), and whether the shard
    is whole; a damaged one is an error, or with skip_bad a warning and the samples before the damage."""
    end = os.path.getsize(path)
    samples: dict[str, list] = {}  # key -> [image member, offset, size, label], in the order of the tar
    last, whole = None, True
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.offset_data + m.size > end:  # tarfile reads a header whose data was cut off without error
                    whole = False
                    break
                key, ext = split_member(m.name)
                if m.isfile() and ext:
                    s = samples.setdefault(key, [None, 0, 0, -1])
                    if ext in IMAGE_EXTS and s[0] is None:
                        s[:3] = m.name, m.offset_data, m.size
                    elif ext in ("cls", "json"):
                        s[3] = read_label(tar.extractfile(m).read(), ext, f"{m.name} in shard {path}")
                last = m.name
            else:  # a whole tar ends in a zero block; tarfile also stops quietly at a bad or missing header
                tar.fileobj.seek(tar.offset)
                block = tar.fileobj.read(tarfile.BLOCKSIZE)
                whole = len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")
    except (tarfile.TarError, EOFError, OSError):
        whole = False
    if not whole:
        where = f"after member {last}" if last else "at its start"
        problem(
            f"shard {path} is truncated or corrupt {where}; rewrite it (mae shards), or pass --skip-bad-images to "
            "keep the samples before the damage",
            skip_bad,
            f"shard {path} is truncated or corrupt {where}: its later samples are skipped",
        )
        if last:
            samples.pop(split_member(last)[0], None)  # its later members may be the ones cut off
    return [tuple(s) for s in samples.values() if s[0] is not None], whole


def split_member(name: str) -> tuple[str, str]:
    """A member's (key, lower-case extension), split at the first "." after the last "/" as webdataset does."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_label(data: bytes, ext: str, where: str) -> int:
    try:
        if ext == "cls":
            return int(data.decode().strip())
        meta = json.loads(data)
    except ValueError as e:
        raise MAEError(f"cannot read the label {where}: {short(e)}; a .cls holds an integer as text") from e
    found = [meta[k] for k in LABEL_KEYS if isinstance(meta, dict) and isinstance(meta.get(k), int)]
    return found[0] if found else -1  # a .json without a class index (a caption, say) labels nothing


def problem(message: str, skip_bad: bool, warning: str | None = None) -> None:
    if not skip_bad:
        raise MAEError(message)
    print(f"warning: {warning or message.split(';')[0] + '; skipped'}", file=sys.stderr)


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise MAEError(f"cannot read {path}: {short(e)}; fix or remove it") from e


def check_counts(paths: list[str], counts: list[int], damaged: set[int], skip_bad: bool) -> None:
    """Each shard's sample count against timm's `_info.json` or OpenCLIP's `sizes.json` beside it, if any."""
    expected: dict[str, tuple[dict[str, int], str]] = {}
    for folder in {os.path.dirname(p) for p in paths}:
        info, sizes = (os.path.join(folder, n) for n in ("_info.json", "sizes.json"))
        if (data := read_json(info)) is not None:
            counts_of = {}
            for entry in data.get("splits", {}).values():  # timm's: {split: {filenames, shard_lengths}}
                files = [f for pattern in entry.get("filenames", []) for f in expand_braces(pattern)]
                counts_of.update(zip(map(os.path.basename, files), entry.get("shard_lengths", [])))
            expected[folder] = counts_of, info
        else:
            data = read_json(sizes) or {}  # OpenCLIP's: {filename: count}
            expected[folder] = {os.path.basename(k): int(v) for k, v in data.items()}, sizes
    for s, p in enumerate(paths):
        want, source = expected[os.path.dirname(p)]
        n = want.get(os.path.basename(p))
        if s not in damaged and n is not None and n != counts[s]:
            message = f"shard {p} holds {counts[s]} samples, but {source} says {n}"
            problem(f"{message}; rewrite the shard or fix {source}", skip_bad, f"{message}; read as it is")
