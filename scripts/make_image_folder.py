"""Write a folder of generated JPEGs in the ImageFolder layout, for data-path benchmarks and start-up tests.

    python scripts/make_image_folder.py OUT --files 2000 --size 500 375      # ImageNet-like sizes
    python scripts/make_image_folder.py OUT --files 200000 --size 32 32      # many small files

Images are smooth random colour fields with fine noise (about 57 KB a file at 500x375, quality 90,
not incompressible noise), split evenly over `--classes` class folders, seeded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    w, h = args.size
    for c in range(args.classes):
        (args.out / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(args.files):
        coarse = Image.fromarray(rng.integers(0, 256, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = (img + rng.integers(-12, 13, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(args.out / f"class{i % args.classes:03d}" / f"{i:07d}.jpg", quality=90)
    print(f"wrote {args.files} {w}x{h} JPEGs in {args.classes} classes under {args.out}")


if __name__ == "__main__":
    main()
