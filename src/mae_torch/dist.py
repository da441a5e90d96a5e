"""Data-parallel training with PyTorch's own DDP, launched by torchrun: the few calls the engine needs.

`torchrun --nproc_per_node N -m mae_torch pretrain ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them
everything here is a no-op for one process. Backend: NCCL on GPUs (one per process, by LOCAL_RANK), gloo on
CPUs (what the tests use). `--batch-size` stays the global effective batch; each process takes its own slice
of every global batch, and `--device-batch-size` is per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 logs, plots and writes files."""
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes, in place."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj) -> list:
        """Every process's `obj` (e.g. RNG states), in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(device_name: str) -> tuple[Dist, str]:
    """Join the process group when launched by torchrun; returns the group and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        # An elastic restart (torchrun --max-restarts) hands the new workers torchrun's store as the failed
        # attempt left it; their own key prefix keeps them from connecting to the dead workers' addresses.
        store, _, _ = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"mae_torch/attempt_{attempt}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
    if cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    return Dist(rank, world, local_rank), device_name


def teardown() -> None:
    """Leave the process group (a no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
