"""MAE against scratch on CIFAR-10 on a 2-core CPU, with 10% of the labels and with all of them (issue #13).

Data: the CIFAR-10 training images of ../shared/data (JPEG re-encodings, see its README). The last 500 images of
each class are held out for the final numbers and never used for training or for choosing anything.

1. One MAE pretraining on the 45,000 remaining images, labels unused (preset `cifar10-short` by default).
2. (a) 10% of the labels (class-balanced, seeded): fine-tuning from the MAE encoder and from scratch, same recipe
   and epochs, for each seed.
   (b) All labels, one seed: fine-tuning from the MAE encoder, and from scratch for as many more epochs as the
   pretraining cost (in FLOP, as `mae bench` counts them), so both sides get the same total compute.
3. Every run's last-epoch weights are evaluated on the held-out images (`mae evaluate`); results.md gets the
   tables (mean +- std over seeds), the compute in PFLOP, the minutes and the machine (as `mae bench` names it);
   compare.png and compare-all-labels.png the curves. Each run's final weights stay in its folder (model.safetensors).

Epoch-based: a rerun trains the same thing. A finished run (all its epochs in metrics.jsonl) is kept, so a
stopped experiment picks up where it stopped (another preset or recipe needs another --work).
Usage (`mae` on PATH, e.g. the project's venv activated):
    python scripts/cpu_experiment.py [--work runs/cpu-experiment] [--preset cifar10-short] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import yaml
from split_cifar_zip import prepare  # scripts/ is on the path of a script run from it

from mae_torch.config import load_preset

VAL_FRACTION = 0.05  # of the 45,000 training images, for fine-tuning's validation (val_acc)
PRE_VAL_FRACTION = 0.1  # pretraining's default validation split


def mae(*args) -> str:
    cmd = ["mae", *[str(a) for a in args]]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def epochs_done(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(job: str, run: Path, epochs: int, *args) -> None:
    """Run `mae JOB` into RUN unless a finished run with these epochs is already there."""
    if len(epochs_done(run)) >= epochs and (run / "model.safetensors").exists():
        print(f"kept {run} ({epochs} epochs done)", flush=True)
        return
    mae(job, *args, "--epochs", epochs, "--out", run, "--overwrite")


def bench_rows(preset: str) -> list[dict]:
    """`mae bench` of one pretraining and one fine-tuning step: GFLOP per image, and the machine it ran on."""
    out = mae("bench", "--preset", preset, "--batch-size", 8, "--steps", 1, "--warmup", 0, "--mode", "both", "--json")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def cell(v: list[float]) -> str:
    if len(v) == 1:
        return f"{100 * v[0]:.2f}"
    return f"{100 * statistics.mean(v):.2f} ± {100 * statistics.stdev(v):.2f}"


def table(title: str, results: dict[str, list[float]], val: dict[str, list[float]]) -> str:
    rows = [
        f"| fine-tuned from | held-out top-1 ({title}) | per seed | val_acc (last epoch) |",
        "|---|---|---|---|",
    ]
    for k, v in results.items():
        per_seed = ", ".join(f"{100 * x:.2f}" for x in v)
        rows.append(f"| {k} | {cell(v)} | {per_seed} | {cell(val[k])} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/cpu-experiment"))
    ap.add_argument("--zip", type=Path, default=Path("../shared/data/cifar10-train-jpeg.zip"))
    ap.add_argument("--preset", default="cifar10-short", help="model and recipe of both stages")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the 10%%-labels runs")
    ap.add_argument("--pre-epochs", type=int, default=None, help="pretraining epochs (default: preset)")
    ap.add_argument("--ft-epochs", type=int, default=None, help="epochs with 10%% of the labels (default: preset)")
    ap.add_argument("--all-epochs", type=int, default=6, help="fine-tuning epochs with all labels; 0 = skip (b)")
    ap.add_argument("--label-fraction", type=float, default=0.1)
    args = ap.parse_args()
    recipe = load_preset(args.preset)
    args.pre_epochs = args.pre_epochs or recipe["pretrain"]["epochs"]
    args.ft_epochs = args.ft_epochs or recipe["finetune"]["epochs"]
    work, preset = args.work, ["--preset", args.preset]
    data = prepare(args.zip, work / "data")
    pre = work / "pretrain"
    train("pretrain", pre, args.pre_epochs, *preset, "--data", data)

    def finetune(run: str, epochs: int, init: str, seed: int, fraction: float) -> tuple[float, float]:
        extra = ["--pretrained", pre] if init == "MAE encoder" else []
        ft = ["--seed", seed, "--label-fraction", fraction, "--val-fraction", VAL_FRACTION]
        train("finetune", work / run, epochs, *preset, *extra, "--data", data, *ft)
        out = mae("evaluate", "--checkpoint", work / run / "model.safetensors", "--data", data, "--json")
        return json.loads(out)["top1"], epochs_done(work / run)[-1]["val_acc"]

    inits = ("MAE encoder", "scratch")
    few = {k: [] for k in inits}, {k: [] for k in inits}
    for seed in args.seeds:
        for init in inits:
            run = f"finetune-{init.split()[0].lower()}-seed{seed}"
            top1, val_acc = finetune(run, args.ft_epochs, init, seed, args.label_fraction)
            few[0][init].append(top1)
            few[1][init].append(val_acc)
    rows = bench_rows(args.preset)
    flop = {r["mode"]: r["gflop_per_img"] for r in rows}
    pre_images = args.pre_epochs * (1 - PRE_VAL_FRACTION)  # in units of the 45,000 images
    extra = round(pre_images * flop["pretrain"] / ((1 - VAL_FRACTION) * flop["finetune"]))
    report = [
        f"# MAE against scratch on CIFAR-10 (`{args.preset}`), {rows[0]['machine']}\n",
        table(f"{int(100 * args.label_fraction)}% of the labels", *few),
        f"\n{args.pre_epochs} pretraining epochs, then {args.ft_epochs} fine-tuning epochs on each side; seeds "
        f"{' '.join(map(str, args.seeds))}.",
    ]
    runs = [work / f"finetune-{k}-seed{s}" for s in args.seeds for k in ("mae", "scratch")]
    if args.all_epochs:
        full = {k: [] for k in inits}, {k: [] for k in inits}
        for init, epochs in zip(inits, (args.all_epochs, args.all_epochs + extra)):
            top1, val_acc = finetune(f"all-labels-{init.split()[0].lower()}", epochs, init, args.seeds[0], 1.0)
            full[0][init].append(top1)
            full[1][init].append(val_acc)
        report += [
            "\n" + table("all labels", *full),
            f"\n{args.all_epochs} fine-tuning epochs from the MAE encoder; from scratch {args.all_epochs + extra} "
            f"(the {extra} more cost what the pretraining did); seed {args.seeds[0]}.",
        ]
        runs += [work / "all-labels-mae", work / "all-labels-scratch"]
    report.append("\n" + compute(pre, runs, flop))
    (work / "results.md").write_text("\n".join(report) + "\n")
    first = args.seeds[0]
    few_runs = work / f"finetune-scratch-seed{first}", work / f"finetune-mae-seed{first}"
    mae("compare", *few_runs, "--out", work / "compare.png")
    if args.all_epochs:
        mae("compare", work / "all-labels-scratch", work / "all-labels-mae", "--out", work / "compare-all-labels.png")
    print("\n".join(report))


def compute(pre: Path, runs: list[Path], flop: dict[str, float]) -> str:
    """PFLOP (images seen x GFLOP per image) and minutes (the epochs' own times) of every run, from its files."""
    lines = ["| run | images seen | PFLOP | minutes |", "|---|---|---|---|"]
    total_pflop = total_min = 0.0
    for run, mode in [(pre, "pretrain"), *((r, "finetune") for r in runs)]:
        epochs = epochs_done(run)
        batch = yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"]
        images = epochs[-1]["step"] * batch
        pflop, minutes = images * flop[mode] / 1e6, sum(e["epoch_time_s"] for e in epochs) / 60
        total_pflop, total_min = total_pflop + pflop, total_min + minutes
        lines.append(f"| {run.name} | {images:,.0f} | {pflop:.3f} | {minutes:.1f} |")
    lines.append(f"| all | | {total_pflop:.3f} | {total_min:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
