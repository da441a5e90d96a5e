"""Seconds from starting a `mae` training command until its first optimizer step is done.

    python scripts/first_step.py pretrain --preset smoke --data /tmp/many --img-size 32 --out /tmp/run

runs `mae <args> --save-every 1 --overwrite`, waits for the checkpoint written after step 1, prints the
elapsed seconds and stops the run. Start-up is everything before that step: imports, listing the files,
building the model, and (on the in-memory path) decoding the images.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    out = Path(args[args.index("--out") + 1])
    ckpt = out / "checkpoint.pt"
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's checkpoint must not count
    t = time.perf_counter()
    proc = subprocess.Popen(["mae", *args, "--save-every", "1", "--overwrite"])
    try:
        while not ckpt.exists():
            if proc.poll() is not None:
                sys.exit(f"mae exited with {proc.returncode} before its first step")
            time.sleep(0.05)
        print(f"first step done after {time.perf_counter() - t:.1f} s")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
