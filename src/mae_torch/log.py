"""Run logging in one small object: TensorBoard, one JSON line per epoch, and a readable console line.

TensorBoard event files go in the run directory itself, so `tensorboard --logdir runs` lists every run by
its folder name. Images are also written as PNG files (atomically) so no TensorBoard is needed to look.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image
from tqdm.auto import tqdm

SCALARS = ("train_loss", "val_loss", "val_acc", "lr", "img_per_s")


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLogger:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(str(self.run_dir))
        self.interactive = sys.stderr.isatty()

    def print(self, message: str) -> None:
        tqdm.write(message)

    def epoch(self, metrics: dict, eta_s: float) -> None:
        """Log one epoch's metrics everywhere: TensorBoard scalars, metrics.jsonl and the console."""
        epoch = metrics["epoch"]
        for key in SCALARS:
            if key in metrics:
                self.writer.add_scalar(key, metrics[key], epoch)
        self.writer.flush()
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        shown = " ".join(f"{k} {metrics[k]:.4f}" for k in ("train_loss", "val_loss", "val_acc") if k in metrics)
        self.print(
            f"epoch {epoch}: {shown} | lr {metrics['lr']:.2e} | {metrics['img_per_s']:.0f} img/s"
            f"{' | best' if metrics.get('best') else ''} | run ETA {fmt_time(eta_s)}"
        )

    def image(self, name: str, grid: torch.Tensor, epoch: int) -> None:
        """A (3, H, W) image in [0, 1]: to TensorBoard, and to <run>/<name>.png."""
        self.writer.add_image(name, grid, epoch)
        path = self.run_dir / f"{name}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        save_image(grid, str(tmp), format="png")
        tmp.replace(path)

    def close(self) -> None:
        self.writer.close()
