"""Split ../shared/data's CIFAR-10 zip (see its README) into OUT/train (the first 4,500 images of each class) and
OUT/test (the last 500 of each class, held out: never used for training or choosing epochs).

Usage: python scripts/split_cifar_zip.py [ZIP] [OUT] [HELD_OUT]
(defaults: ../shared/data/cifar10-train-jpeg.zip data/cifar 500)
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

HELD_OUT = 500  # per class; the shared data README's usual choice


def prepare(zip_path: Path, out: Path, held_out: int = HELD_OUT) -> Path:
    if (out / "test").exists():
        return out
    with zipfile.ZipFile(zip_path) as z:
        by_class: dict[str, list[str]] = {}
        for name in sorted(n for n in z.namelist() if n.endswith(".jpg")):
            by_class.setdefault(name.split("/")[1], []).append(name)
        for cls, files in by_class.items():
            for i, name in enumerate(files):
                dest = out / ("train" if i < len(files) - held_out else "test") / cls / Path(name).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(name))
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    print(
        prepare(
            Path(args[0] if args else "../shared/data/cifar10-train-jpeg.zip"),
            Path(args[1] if len(args) > 1 else "data/cifar"),
            int(args[2]) if len(args) > 2 else HELD_OUT,
        )
    )
