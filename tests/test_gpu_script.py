"""scripts/gpu_speedrun.sh end to end at tiny size on the CPU: what a GPU run of it leaves, in one folder.

A zip laid out as ../shared/data's CIFAR-10 (train/<class>/NNNN.jpg) of generated images; the script's settings
for a tiny run (its header) make it seconds long. Checks the files it leaves (at most 8, as a device run brings
back), the bench rows (bare and augmented, both stages, then the other preset) and the speedrun's results.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": 0, "green": 1, "blue": 2}


def cifar_like_zip(path: Path, per_class: int = 24) -> Path:
    rs = np.random.RandomState(0)
    with zipfile.ZipFile(path, "w") as z:
        for name, channel in COLOURS.items():
            for i in range(per_class):
                arr = rs.randint(0, 80, (16, 16, 3)).astype(np.uint8)
                arr[..., channel] = rs.randint(170, 256, (16, 16))
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=95)
                z.writestr(f"train/{name}/{i:04d}.jpg", buf.getvalue())
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_the_gpu_script_leaves_bench_rows_results_and_weights(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "PYTHON": sys.executable,
        "OUT": str(out),
        "ZIP": str(cifar_like_zip(tmp_path / "c.zip")),
        "DEVICE": "cpu",
        "MINUTES": "0.3",
        "PRESET": "smoke",
        "HELD_OUT": "4",
        "BENCH_PRESET": "smoke",
        "BENCH_BATCH": "8",
        "SR_BENCH_BATCH": "8",
        "BENCH_STEPS": "2",
        "COMPILE": "0",
        "WORKERS": "0",
    }
    done = subprocess.run(["bash", "scripts/gpu_speedrun.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        ["bench.jsonl", "log.txt", "mae.safetensors", "model.safetensors", "reconstructions.png", "results.json",
         "results.md", "run.tar.gz"]
    )  # fmt: skip
    assert all((out / f).stat().st_size < 16 << 20 for f in files)
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    first = [(r["mode"], r["augmented"]) for r in rows[:4]]
    assert first == [("pretrain", False), ("pretrain", True), ("finetune", False), ("finetune", True)]
    assert len(rows) == 6 and all(r["img_per_s"] > 0 and 0 < r["fraction_of_peak"] for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 3 * 4 and results["split"].endswith("/test") and 0 <= results["top1"] <= 1
    assert "speedrun exit 0" in (out / "log.txt").read_text()
