"""Soak test (not a unit test): pretrain the smoke preset for ~10 minutes under random SIGKILLs and resumes.

Reports the number of kills; the steps lost (checkpointed steps missing after a kill, as a torn write would
lose them; target 0: with --save-every 1 at most the step in flight is redone); the final weights against an
uninterrupted run of the same config (target: identical); and memory, the resident size of the run process
sampled every second, first against last minute, to catch growth.

Usage: python scripts/soak.py [--minutes 10] [--data FOLDER] (made-up images when no folder is given)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def checkpoint_step(run: Path) -> int:
    path = run / "checkpoint.pt"
    return torch.load(path, weights_only=True)["step"] if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mae-soak-"))
    data = args.data or work / "data"
    if not args.data:
        rng = np.random.default_rng(0)
        for c in range(4):
            (data / f"c{c}").mkdir(parents=True)
            for i in range(128):
                Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(data / f"c{c}" / f"{i}.png")
    config = [
        "--preset",
        "smoke",
        "--data",
        str(data),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--num-workers",
        "0",
        "--epochs",
        str(args.epochs),
        "--save-every",
        "1",
    ]
    mae = [sys.executable, "-m", "mae_torch", "pretrain"]
    t0 = time.time()
    subprocess.run([*mae, *config, "--out", str(work / "whole")], env=ENV, check=True, capture_output=True)
    print(f"uninterrupted run: {time.time() - t0:.0f} s")

    run, kills, lost, memory = work / "killed", 0, 0, []
    deadline = time.time() + 60 * args.minutes
    cmd = [*mae, *config, "--out", str(run)]
    while True:
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        kill_at = time.time() + random.uniform(2, 20)
        while proc.poll() is None and time.time() < min(kill_at, deadline):
            memory.append((time.time(), rss_mb(proc.pid)))
            time.sleep(1)
        if proc.poll() is not None:
            if proc.returncode:
                sys.exit(f"run failed: {proc.stderr.read()[-2000:]}")
            break
        before = checkpoint_step(run)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        lost += max(0, before - checkpoint_step(run))  # 0: what was checkpointed survived the kill
        print(f"kill {kills} at step {before}", flush=True)
        cmd = [*mae, "--resume", str(run)]
        if time.time() > deadline:
            subprocess.run(cmd, env=ENV, check=True, capture_output=True)  # finish the run
            break
    a, b = load_file(str(work / "whole" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    first = [m for t, m in memory if t < memory[0][0] + 60] if memory else [0]
    last = [m for t, m in memory if t > memory[-1][0] - 60] if memory else [0]
    print(
        f"kills: {kills}; steps lost: {lost}; final weights vs uninterrupted: max |diff| = {diff:.3g}; "
        f"resident memory: {np.mean(first):.0f} MB in the first minute, {np.mean(last):.0f} MB in the last"
    )


if __name__ == "__main__":
    main()
