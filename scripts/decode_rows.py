"""Images per second of the streaming data path per DataLoader worker, for several data folders and several
versions of the code, alternated in one run so that a shared machine's noise falls on every row alike.

    git worktree add /tmp/mae-before 8c3eda5       # the code to compare against
    python scripts/decode_rows.py --src /tmp/mae-before/src src \\
        --data /tmp/imnet /tmp/imnet-shards /tmp/imnet-shards-256 --rounds 3

Each (code, data) pair is measured in a fresh process (`bench.data_throughput`: the preset's training
augmentation for --mode, --workers DataLoader workers, --batches batches after one of warm-up), round after
round; the table gives each pair's median and its ratio to the first row. A code version that cannot read a
data folder (shards before they were supported) is left out of that row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

CHILD = """
import json, sys
from mae_torch.bench import data_throughput
a = json.loads(sys.argv[1])
r = data_throughput(a["data"], a["preset"], a["mode"], a["batch"], a["batches"], 1, "cpu", a["workers"])
print(json.dumps(r["img_per_s"]))
"""


def measure(src: str, data: str, args: argparse.Namespace) -> float | None:
    keys = ("preset", "mode", "batch", "batches", "workers")
    params = json.dumps({"data": data, **{k: getattr(args, k) for k in keys}})
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    out = subprocess.run([sys.executable, "-c", CHILD, params], env=env, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1]) if out.returncode == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", nargs="+", default=["src"], help="the src/ folders of the code versions to compare")
    p.add_argument("--data", nargs="+", required=True, help="image folders or folders of shards")
    p.add_argument("--preset", default="imagenet-vit-base")
    p.add_argument("--mode", default="pretrain", choices=["pretrain", "finetune"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from mae_torch.bench import machine  # the installed package names the machine

    print(f"machine: {machine(torch.device('cpu'))}")
    pairs = [(s, d) for s in args.src for d in args.data]
    seen: dict = {pair: [] for pair in pairs}
    for r in range(args.rounds):
        for pair in pairs:
            seen[pair].append(measure(*pair, args))
            print(f"round {r + 1}: {pair[0]} {pair[1]}: {seen[pair][-1]}", file=sys.stderr, flush=True)
    rows = [(pair, statistics.median(v)) for pair, v in seen.items() if None not in v]
    print(f"| code | data | img/s per worker ({args.workers} worker(s), median of {args.rounds}) | ratio |")
    print("|---|---|---|---|")
    for (src, data), v in rows:
        runs = ", ".join(f"{x:.1f}" for x in seen[(src, data)])
        print(f"| {src} | {data} | {v:.1f} ({runs}) | {v / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
