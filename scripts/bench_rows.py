"""Time the selection of each sample's rows: `torch.gather` with an expanded index (the official code's form)
against `ops.take_rows` (one flat `index_select`), forward and backward, in one process, alternating.

    python scripts/bench_rows.py [--batch 128 --tokens 257 --rows 192 --width 192 --reps 10]

The default shapes are the last decoder block's at `cifar10-vit-tiny` (docs/benchmarks-log.md).
"""

import argparse
import time

import torch

from mae_torch.ops import take_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("batch", 128), ("tokens", 257), ("rows", 192), ("width", 192), ("reps", 10)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(a.batch, a.tokens, a.width, dtype=dtype, requires_grad=True)
        index = torch.stack([torch.randperm(a.tokens)[: a.rows] for _ in range(a.batch)])
        grad = torch.randn(a.batch, a.rows, a.width, dtype=dtype)
        ways = {
            "gather": lambda x=x, i=index: torch.gather(x, 1, i.unsqueeze(-1).expand(-1, -1, x.shape[-1])),
            "take_rows": lambda x=x, i=index: take_rows(x, i),
        }
        for _ in range(2):  # alternating, so a change in the host's load shows as disagreement
            for name, select in ways.items():
                select().backward(grad)  # warm-up
                t = time.perf_counter()
                for _ in range(a.reps):
                    select().backward(grad)
                ms = (time.perf_counter() - t) / a.reps * 1e3
                print(f"{str(dtype):15s} {name:9s} forward + backward {ms:6.2f} ms")


if __name__ == "__main__":
    main()
