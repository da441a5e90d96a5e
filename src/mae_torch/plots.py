"""Pictures a person opens without TensorBoard: training curves, run comparisons, reconstruction grids.

Design decisions:
- Everything reads a run's `metrics.jsonl`, the same record TensorBoard gets, so a plot can be redrawn
  from any run directory, finished or not (`mae compare`).
- Files are written atomically (temporary file, then rename) since they are refreshed every epoch while
  someone may be looking at them.
- matplotlib's Agg backend: no display needed, safe in CI and on servers.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .errors import MAEError  # noqa: E402

PANELS = [  # (title, y label, metrics drawn on it)
    ("loss", "loss", ("train_loss", "val_loss")),
    ("validation accuracy", "top-1 accuracy", ("val_acc", "knn_acc")),
    ("learning rate", "learning rate", ("lr",)),
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise MAEError(f"{run_dir} has no metrics.jsonl: pass run directories written by mae pretrain/finetune")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_runs(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Curves of one or several runs ({name: metrics}) on shared axes, one panel per quantity present."""
    panels = [p for p in PANELS if any(k in m for ms in runs.values() for m in ms for k in p[2])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (name, ylabel, keys) in zip(axes[0], panels):
        for i, (run, metrics) in enumerate(runs.items()):
            for key in keys:  # one colour per run, dashed for training and solid for validation
                points = [(m["epoch"], m[key]) for m in metrics if key in m]
                if points:
                    style = "--" if key.startswith("train") else "-"
                    label = key if len(runs) == 1 else f"{run} {key}"
                    marker = "." if len(points) < 30 else None
                    ax.plot(*zip(*points), style, color=f"C{i}", marker=marker, label=label)
        ax.set(title=name, xlabel="epoch", ylabel=ylabel)
        if name == "loss":
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_curves(run_dir: str | Path) -> None:
    """Refresh <run>/curves.png from its metrics.jsonl."""
    plot_runs({Path(run_dir).name: read_metrics(run_dir)}, Path(run_dir) / "curves.png", Path(run_dir).name)


def compare_runs(run_dirs: list[str], path: str | Path) -> None:
    """Several runs' curves on shared axes, named by their directories (e.g. scratch against pretrained)."""
    names = [Path(r).name or str(r) for r in run_dirs]
    if len(set(names)) < len(names):
        names = [str(r) for r in run_dirs]
    plot_runs({n: read_metrics(r) for n, r in zip(names, run_dirs)}, path)


def save_reconstructions(grid: torch.Tensor, path: str | Path, caption: str = "") -> None:
    """A (3, H, W) grid from `viz.reconstruction_grid` with its columns labelled and a caption."""
    h, w = grid.shape[1:]
    fig = plt.figure(figsize=(max(4.0, w / 100), max(2.0, h / 100 + 0.8)))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
    ax.set_xticks([w * (i + 0.5) / 3 for i in range(3)], ["masked input", "reconstruction", "original"])
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if caption:
        ax.set_xlabel(caption, fontsize=8, wrap=True)
    save_figure(fig, path)
