"""Run logging in one small object: TensorBoard, one JSON line per epoch, and a readable console line.

TensorBoard event files go in the run directory itself, so `tensorboard --logdir runs` lists every run by
its folder name. Each epoch also refreshes curves.png and reconstructions.png (atomically), so no
TensorBoard is needed to look.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .plots import plot_curves, save_reconstructions

SCALARS = ("train_loss", "val_loss", "val_acc", "knn_acc", "lr", "img_per_s")


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def in_notebook() -> bool:
    """True inside a Jupyter kernel, where progress bars render although stderr is not a terminal."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class RunLogger:
    """Logs of one run; `active=False` (processes other than rank 0 under DDP) makes every call a no-op."""

    def __init__(self, run_dir: Path, active: bool = True):
        self.run_dir, self.active = Path(run_dir), active
        self.writer = SummaryWriter(str(self.run_dir)) if active else None
        self.interactive = active and (sys.stderr.isatty() or in_notebook())

    def print(self, message: str) -> None:
        if self.active:
            tqdm.write(message)

    def truncate_metrics(self, epochs: int) -> None:
        """Keep the first `epochs` lines of metrics.jsonl: a resumed run logs the later ones again."""
        path = self.run_dir / "metrics.jsonl"
        if self.active and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] <= epochs))

    def epoch(self, metrics: dict, eta_s: float) -> None:
        """Log one epoch's metrics everywhere: TensorBoard scalars, metrics.jsonl and the console."""
        if not self.active:
            return
        epoch = metrics["epoch"]
        for key in SCALARS:
            if key in metrics:
                self.writer.add_scalar(key, metrics[key], epoch)
        self.writer.flush()
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        plot_curves(self.run_dir)
        shown = " ".join(
            f"{k} {metrics[k]:.4f}" for k in ("train_loss", "val_loss", "val_acc", "knn_acc") if k in metrics
        )
        self.print(
            f"epoch {epoch}: {shown} | lr {metrics['lr']:.2e} | {metrics['img_per_s']:.0f} img/s"
            f"{' | best' if metrics.get('best') else ''} | run ETA {fmt_time(eta_s)}"
        )

    def reconstructions(self, grid: torch.Tensor, epoch: int, caption: str) -> None:
        """A (3, H, W) reconstruction grid in [0, 1]: to TensorBoard, and labelled to reconstructions.png."""
        self.writer.add_image("reconstructions", grid, epoch)
        save_reconstructions(grid, self.run_dir / "reconstructions.png", caption)

    def close(self) -> None:
        if self.active:
            self.writer.close()
