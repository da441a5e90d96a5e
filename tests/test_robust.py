"""Scale-out and survival: DDP under torchrun, kill -9 and resume, non-finite losses, a full disk.

The distributed test launches two CPU processes with torchrun (gloo backend) and checks that a global batch
B split over them trains to the same weights as one process with batch B. The crash test kills a run with
SIGKILL at a random moment and checks that resuming ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mae_torch import runtime
from mae_torch.cli import main
from mae_torch.mae import MaskedAutoencoder

FP32 = ["--preset", "smoke", "--device", "cpu", "--precision", "fp32", "--num-workers", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust") / "data"
    rng = np.random.default_rng(0)
    for c, channel in (("red", 0), ("blue", 2)):
        (root / c).mkdir(parents=True)
        for i in range(40):
            img = (rng.random((16, 16, 3)) * 80).astype(np.uint8)
            img[..., channel] += 150
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def mae_cli(*args) -> list[str]:
    return [sys.executable, "-m", "mae_torch", *[str(a) for a in args]]


def test_two_processes_train_like_one(data, tmp_path):
    args = ["finetune", *FP32, "--data", data, "--epochs", "2", "--batch-size", "16", "--device-batch-size", "8"]
    assert main([str(a) for a in [*args, "--out", tmp_path / "one"]]) == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mae_torch",
        *[str(a) for a in [*args, "--out", tmp_path / "two"]],
    ]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stdout and done.stdout.count("epoch 2:") == 1  # rank 0 logs, only
    assert max_diff(tmp_path / "one", tmp_path / "two") < 1e-5
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]["torch"]) == 2  # each process's RNG state, for an exact resume


def test_sigkill_at_a_random_moment_then_resume_gives_the_same_weights(data, tmp_path):
    args = [
        "pretrain",
        *FP32,
        "--data",
        data,
        "--epochs",
        "6",
        "--batch-size",
        "8",
        "--device-batch-size",
        "4",
        "--save-every",
        "1",
    ]
    # every run in a subprocess with one thread: the same float summation order in all of them
    subprocess.run(mae_cli(*args, "--out", tmp_path / "whole"), env=ENV, check=True, capture_output=True)
    run = tmp_path / "killed"
    rng = random.Random(os.getpid())
    for _attempt in range(5):  # until a kill lands while the run is still training
        proc = subprocess.Popen(
            mae_cli(*args, "--out", run, "--overwrite"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while not (run / "checkpoint.pt").exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, "the run always finished before the kill"
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    subprocess.run(mae_cli("pretrain", "--resume", run), env=ENV, check=True, capture_output=True)
    assert max_diff(tmp_path / "whole", run) == 0.0, f"killed after step {step}"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"epoch": ')[1].split(",")[0]) for line in lines] == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make the MAE loss NaN at the given forward calls (counted from 0) of the next run."""

    def arm(*calls: int):
        forward, count = MaskedAutoencoder.forward, [0]

        def poisoned(self, *a, **kw):
            out = forward(self, *a, **kw)
            if self.training:
                if count[0] in calls:
                    out.loss = out.loss * float("nan")
                count[0] += 1
            return out

        monkeypatch.setattr(MaskedAutoencoder, "forward", poisoned)

    return arm


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, nan_at_call, capsys):
    nan_at_call(5)  # batch 16 = 2 micro-batches of 8, 4 steps per epoch: call 5 is in step 2 of epoch 1
    args = ["pretrain", *FP32, "--data", data, "--epochs", "2", "--out", tmp_path / "run"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing bad was saved


def test_skip_nonfinite_drops_those_updates_and_finishes(data, tmp_path, nan_at_call):
    nan_at_call(5, 20)
    args = ["pretrain", *FP32, "--data", data, "--epochs", "2", "--skip-nonfinite", "2", "--out", tmp_path / "run"]
    assert main([str(a) for a in args]) == 0
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


def test_a_full_disk_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main([str(a) for a in ["pretrain", *FP32, "--data", data, "--epochs", "1", "--out", run]]) == 0
    good = torch.load(run / "checkpoint.pt", weights_only=True)

    def full(path, write):
        if path.name == "checkpoint.pt":

            def write(tmp):  # half a file, then the disk is full
                Path(tmp).write_bytes(b"half")
                raise OSError(errno.ENOSPC, "No space left on device")

        return original(path, write)

    original = runtime.atomic_write
    monkeypatch.setattr("mae_torch.engine.atomic_write", full)
    assert main([str(a) for a in ["pretrain", "--resume", run, "--epochs", "2"]]) == 2
    assert "No space left on device" in capsys.readouterr().err
    kept = torch.load(run / "checkpoint.pt", weights_only=True)
    assert kept["step"] == good["step"] and not list(run.glob(".checkpoint.pt*.tmp"))


def test_resume_refuses_a_checkpoint_of_another_architecture(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([str(a) for a in ["pretrain", *FP32, "--data", data, "--epochs", "1", "--out", run]]) == 0
    capsys.readouterr()
    assert main([str(a) for a in ["pretrain", "--resume", run, "--embed-dim", "64", "--epochs", "2"]]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "pos_embed (1, 17, 32) vs (1, 17, 64)" in err
    assert len(err.strip().splitlines()) == 1


class Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))  # would create a file when unpickled


def test_a_malicious_checkpoint_is_never_executed(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([str(a) for a in ["pretrain", *FP32, "--data", data, "--epochs", "1", "--out", run]]) == 0
    target = tmp_path / "pwned"
    torch.save({"model": Payload(target)}, run / "checkpoint.pt")
    capsys.readouterr()
    assert main([str(a) for a in ["pretrain", "--resume", run, "--epochs", "2"]]) == 2
    assert "it was not run" in capsys.readouterr().err
    assert not target.exists()
