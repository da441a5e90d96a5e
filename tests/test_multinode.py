"""Past one machine: two torchrun launchers on 127.0.0.1 as two nodes (gloo), training on tar shards like one
process, and `--resume auto` carrying an elastic job (`--max-restarts 1`) through a killed worker to the weights of
an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import write_images

from mae_torch.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN = ["--preset", "smoke", "--device", "cpu", "--precision", "fp32", "--num-workers", "0", "--batch-size", "16"]
TRAIN += ["--device-batch-size", "8", "--epochs", "3", "--save-every", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode")
    write_images(root / "images", ["red", "green"], per_class=40)
    assert main(["shards", str(root / "images"), str(root / "shards"), "--shard-size", "20"]) == 0
    return root / "shards"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(node_args: list[str], out: Path, data: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *node_args, "--nproc-per-node", str(nproc), "-m", "mae_torch"]
    cmd += ["finetune", *TRAIN, "--data", str(data), "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(o[-4000:] for o in outs)
    return outs


def max_diff(a: Path, b: Path) -> float:
    wa, wb = (load_file(str(r / "model.safetensors")) for r in (a, b))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def two_nodes(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-nodes") / "run"
    port = str(free_port())
    static = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    finish([launcher([*static, "--node-rank", str(r)], out, shards) for r in (0, 1)])
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun launchers on one Linux machine")
def test_two_nodes_on_one_machine_train_like_one_process(two_nodes, shards, tmp_path):
    assert main(["finetune", *TRAIN, "--data", str(shards), "--out", str(tmp_path / "one")]) == 0
    assert max_diff(two_nodes, tmp_path / "one") < 1e-5
    ckpt = torch.load(two_nodes / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]["torch"]) == 2 and ckpt["epoch"] == 2  # both processes' states, 3 epochs


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun launchers on one Linux machine")
def test_an_elastic_job_survives_a_killed_worker_with_resume_auto(two_nodes, shards, tmp_path):
    """One launcher of two workers (torchrun's restart of a whole job across launchers sharing one host hung in
    2 of 4 tries here, a rendezvous matter of torchrun's, so this is the one-node case); the restarted workers
    must land on the two-node run's weights."""
    out = tmp_path / "elastic"
    proc = launcher(["--standalone", "--max-restarts", "1"], out, shards, "--resume", "auto", nproc=2)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill a worker once a few steps are checkpointed
        ckpt = out / "checkpoint.pt"
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 3:
            break
        time.sleep(0.2)
    workers = children(proc.pid)
    assert len(workers) == 2, "the launcher's two workers were not found"
    os.kill(workers[-1], signal.SIGKILL)
    (output,) = finish([proc])
    assert "resumed" in output and "exitcode: -9" in output  # killed, restarted, continued from the checkpoint
    assert max_diff(out, two_nodes) < 1e-6  # the weights of the uninterrupted run
