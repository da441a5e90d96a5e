"""MAE against scratch with 10% of the labels, on a 2-core CPU in about an hour (issue #6's CPU experiment).

Data: the CIFAR-10 training images of ../shared/data (JPEG re-encodings, see its README). The last 500 images of
each class are held out for the final numbers and never used for training or model selection.

1. MAE pretraining on all 45,000 remaining images, labels unused: a reduced ViT-T (4x4 patches, 6 blocks,
   width 192; decoder 2 blocks), sin-cos positions, norm_pix_loss, random resized crop (0.2-1) and flips.
2. Fine-tuning on a class-balanced 10% of the labels (seeded), from the MAE encoder and from scratch, with the
   same recipe and budget, for each seed. The final epoch's weights are evaluated (no epoch picked on labels
   outside the 10%).
3. A markdown table (mean and spread over seeds) and the curves of the first seed.

Usage: python scripts/cpu_experiment.py [--work runs/cpu-experiment] [--seeds 0 1] [--pre-epochs 6]
(`mae` must be on PATH, e.g. the project's venv activated). With `--preset NAME` (e.g. cifar10-short) both stages
take that preset's model and recipe as they are; only the data, the seed, the label fraction and the epochs
come from here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from split_cifar_zip import prepare  # scripts/ is on the path of a script run from it

MODEL = [
    "--preset",
    "cifar10-vit-tiny",
    "--patch-size",
    "4",
    "--depth",
    "6",
    "--decoder-depth",
    "2",
    "--pos-embed",
    "sincos",
    "--global-pool",
    "avg",
    "--num-workers",
    "1",
]


PRE = ["--batch-size", 256, "--blr", 1.5e-4, "--warmup-epochs", 1, "--norm-pix-loss", "--crop-scale", 0.2, 1, "--hflip"]
FT = ["--batch-size", 128, "--blr", 1e-3, "--warmup-epochs", 3, "--crop-scale", 0.35, 1, "--hflip"]
FT += ["--label-smoothing", 0.1, "--drop-path", 0.1]


def mae(*args) -> str:
    cmd = ["mae", *[str(a) for a in args]]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/cpu-experiment"))
    ap.add_argument("--zip", type=Path, default=Path("../shared/data/cifar10-train-jpeg.zip"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--pre-epochs", type=int, default=6)
    ap.add_argument("--ft-epochs", type=int, default=25)
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--preset", default="", help="take model and recipe from this preset instead of the flags here")
    args = ap.parse_args()
    data, work = args.work / "data", args.work
    prepare(args.zip, data)
    t0 = time.time()
    pre = work / "pretrain"
    model, pre_recipe, ft_recipe = (["--preset", args.preset], [], []) if args.preset else (MODEL, PRE, FT)
    done = (pre / "metrics.jsonl").read_text().count("\n") if (pre / "metrics.jsonl").exists() else 0
    if done < args.pre_epochs:  # a stopped pretraining has weights but not all its epochs: run it again
        mae("pretrain", *model, *pre_recipe, "--data", data, "--epochs", args.pre_epochs, "--out", pre, "--overwrite")
    results: dict[str, list[float]] = {"mae": [], "scratch": []}
    for seed in args.seeds:
        for init in ("mae", "scratch"):
            run = work / f"finetune-{init}-seed{seed}"
            extra = ["--pretrained", pre] if init == "mae" else []
            mae(
                "finetune",
                *model,
                *ft_recipe,
                *extra,
                "--data",
                data,
                "--seed",
                seed,
                "--label-fraction",
                args.label_fraction,
                "--epochs",
                args.ft_epochs,
                "--val-fraction",
                0.05,
                "--out",
                run,
                "--overwrite",
            )
            out = mae("evaluate", "--checkpoint", run / "model.safetensors", "--data", data, "--json")
            results[init].append(json.loads(out)["top1"])
    minutes = (time.time() - t0) / 60

    def cell(v: list[float]) -> str:
        spread = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{100 * statistics.mean(v):.2f} ± {100 * spread:.2f}"

    seeds = " ".join(map(str, args.seeds))
    table = "\n".join(
        [
            f"| fine-tuned from | top-1 on 5,000 held-out images, mean ± std over seeds {seeds} | per seed |",
            "|---|---|---|",
            *(
                f"| {'MAE encoder' if k == 'mae' else 'scratch'} | {cell(v)} | "
                f"{', '.join(f'{100 * x:.2f}' for x in v)} |"
                for k, v in results.items()
            ),
        ]
    )
    report = (
        f"{table}\n\n{int(args.label_fraction * 100)}% of the labels, {args.pre_epochs} pretraining epochs, "
        f"{args.ft_epochs} fine-tuning epochs; {minutes:.0f} minutes in all.\n"
    )
    (work / "results.md").write_text(report)
    mae(
        "compare",
        work / f"finetune-scratch-seed{args.seeds[0]}",
        work / f"finetune-mae-seed{args.seeds[0]}",
        "--out",
        work / "compare.png",
    )
    print(report)


if __name__ == "__main__":
    main()
