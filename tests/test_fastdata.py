"""The fast data path: batched augmentation on the device, uint8 tensors in memory, the decode cache."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mae_torch.augment import random_hflip, random_resized_crop, random_translate
from mae_torch.bench import KERNEL_LIMITS, cpu_model, machine
from mae_torch.cli import main
from mae_torch.data import ImageFiles, build_datasets
from mae_torch.data.memory import DeviceBatches, in_memory
from mae_torch.runtime import CPU_FEATURES

CPU = torch.device("cpu")


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(20):
            img = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "data" / c / f"{i}.png")
    return tmp_path / "data"


def test_full_crop_is_the_identity():
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(random_resized_crop(x, (1.0, 1.0), (1.0, 1.0)), x, atol=1e-5, rtol=0)


def test_crop_magnifies_a_part_of_the_image():
    ramp = torch.linspace(0, 1, 32).expand(16, 3, 32, 32).contiguous()  # value = horizontal position
    out = random_resized_crop(ramp, (0.25, 0.25), (1.0, 1.0))  # half the width, somewhere inside
    spans = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert torch.allclose(spans, torch.full_like(spans, 0.5), atol=0.05)
    assert out.min() >= 0 and out.max() <= 1 and out[:, 0, 0, 0].std() > 0.05  # positions differ


def test_translate_shifts_by_whole_pixels_within_the_limit():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0  # one bright pixel per image
    out = random_translate(x, 4)
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # moved, not blurred
    where = out[:, 0].flatten(1).argmax(1)
    dy, dx = where // 16 - 8, where % 16 - 8
    assert dy.abs().max() <= 4 and dx.abs().max() <= 4 and len(set(zip(dy.tolist(), dx.tolist()))) > 10
    assert torch.equal(random_translate(x, 0), x)


def test_translate_equals_the_affine_shift_with_zeros_outside():
    """The gather gives exactly what an affine grid with nearest sampling and zero padding gives."""
    x = torch.randn(32, 3, 16, 16)
    torch.manual_seed(1)
    out = random_translate(x, 4)
    torch.manual_seed(1)
    shift = torch.randint(-4, 5, (2, 32)).float()  # the same draws
    theta = torch.zeros(32, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[0] / 16, 2 * shift[1] / 16
    grid = torch.nn.functional.affine_grid(theta, [32, 3, 16, 16], align_corners=False)
    reference = torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    assert torch.equal(out, reference)


def test_hflip_flips_about_half():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 4, 4)
    out = random_hflip(x)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 16 < int(flipped.sum()) < 48


def test_in_memory_matches_files_and_is_cached(folder, monkeypatch):
    ds = ImageFiles([str(p) for p in sorted(folder.glob("*/*.png"))], [0] * 20 + [1] * 20, 16)
    mem = in_memory(ds, CPU)
    assert mem.images.dtype == torch.uint8 and mem.images.shape == (40, 3, 16, 16)
    for i in (0, 7, 39):
        assert torch.equal(mem.images[i], ds[i][0]) and int(mem.labels[i]) == ds[i][1]
    caches = list((folder / ".mae-cache").glob("*.safetensors"))
    assert len(caches) == 1 and torch.equal(load_file(str(caches[0]))["images"], mem.images)

    monkeypatch.setattr(ImageFiles, "__getitem__", lambda self, i: 1 / 0)  # a second call must not decode
    assert torch.equal(in_memory(ds, CPU).images, mem.images)
    monkeypatch.undo()

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a" / "0.png")  # new content: new key
    assert in_memory(ds, CPU).images[0].sum() == 0
    assert len(list((folder / ".mae-cache").glob("*.safetensors"))) == 2


def test_splits_and_batches(folder):
    train, val, _ = build_datasets(str(folder), data_root=None, img_size=16, val_fraction=0.2, seed=0)
    mem = in_memory(val, CPU)
    assert len(mem.images) == len(val) == 8
    assert all(torch.equal(mem.images[i], val[i][0]) for i in range(8))
    batches = DeviceBatches(mem, CPU)
    assert [len(x) for x, _ in batches.batches(torch.arange(8), 3)] == [3, 3]
    assert [len(x) for x, _ in batches.batches(torch.arange(8), 3, drop_last=False)] == [3, 3, 2]


def test_in_memory_and_streaming_paths_train_identically_without_augmentation(folder, tmp_path):
    """Same order, same pixels: with augmentation the paths differ by design (workers crop the original)."""
    args = [
        "pretrain",
        "--preset",
        "smoke",
        "--data",
        folder,
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--epochs",
        "2",
        "--num-workers",
        "0",
    ]
    for name, flag in (("mem", "--in-memory"), ("loader", "--no-in-memory")):
        assert main([str(a) for a in [*args, flag, "--out", tmp_path / name]]) == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("mem", "loader"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_attention_kernels_agree():
    from mae_torch.vit import ViT, set_attention

    torch.manual_seed(0)
    vit = ViT(16, 4, 3, 32, 2, 2, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    set_attention(vit, "math")
    a = vit.forward_features(x)
    set_attention(vit, "sdpa")
    torch.testing.assert_close(vit.forward_features(x), a, atol=1e-5, rtol=1e-5)


def test_bench_counts_the_flops_of_a_training_step(capsys):
    import json

    assert main(["bench", "--preset", "smoke", "--steps", "1", "--warmup", "0", "--baseline", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["mode"], r["design"]) for r in rows] == [  # the baseline first, with the allocator's defaults
        ("pretrain", "baseline"),
        ("pretrain", "mae-torch"),
        ("finetune", "mae-torch"),
    ]
    assert all(r["img_per_s"] > 0 and 0 < r["data_fraction"] < 1 for r in rows)
    # smoke classifier: 16x16 image, 4x4 patches (L = 16, N = 17 tokens), width 32, 2 blocks, MLP 2x, 10 classes.
    # Forward multiply-adds x 2 = FLOPs; backward costs twice the forward, so a step is 3x the forward.
    L, N, D, depth, hidden = 16, 17, 32, 2, 64
    block = N * D * 3 * D + N * D * D + 2 * N * D * hidden + 2 * N * N * D  # qkv, proj, mlp, q@k and attn@v
    forward = 2 * (L * D * 4 * 4 * 3 + depth * block + D * 10)
    # the patch embedding's input gradient is never needed (its input is the image): one backward matmul less
    assert rows[2]["gflop_per_img"] * 1e9 == pytest.approx(3 * forward - 2 * L * D * 48, rel=1e-3)
    # Pretraining: the baseline's work less what training skips, the visible patches' and CLS's tokens (V of
    # them) in the last and only decoder block of width E: their query, output and MLP rows, their rows of
    # q@k and attn@v over all N tokens, and their pixel predictions (P values each).
    V, E, P = 1 + L // 4, 32, 48
    skipped = 2 * (V * (E * E + E * E + 2 * E * hidden) + 2 * V * N * E + V * E * P)
    assert rows[1]["gflop_per_img"] * 1e9 == pytest.approx(rows[0]["gflop_per_img"] * 1e9 - 3 * skipped, rel=1e-3)


FAULTS = """
import resource, sys, torch
from mae_torch.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(2):
    torch.ones(16 << 20)  # warm-up: the heap grows to fit it (and its alignment)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 << 20)  # 64 MiB, freed at once: glibc alone maps and unmaps it each time
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory acts on glibc only")
def test_kept_freed_memory_is_reused_without_page_faults(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")]:
        monkeypatch.delenv(k)

    def faults(how: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, how], capture_output=True, text=True, check=True).stdout
        kept, n = out.split()
        return kept, int(n)

    (applied, kept), (_, plain) = faults("keep"), faults("plain")
    assert applied == "True"
    assert plain > 20 * (64 << 20) // 4096 // 2  # at least half of the 64 MiB pages faulted in each time
    assert kept < plain / 4  # a few new pages while the heap settles, then none
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user's own allocator setting wins
    assert faults("keep")[0] == "False"


def test_auto_attention_follows_the_measured_kernel_per_precision():
    from mae_torch.runtime import resolve_attention

    cuda = torch.device("cuda")
    assert resolve_attention("auto", CPU, "bf16") == "math"  # faster on CPUs in bf16 (docs/benchmarks-log.md)
    assert resolve_attention("auto", CPU, "fp32") == resolve_attention("auto", cuda, "bf16") == "sdpa"
    assert resolve_attention("math", CPU, "fp32") == "math" and resolve_attention("sdpa", CPU, "bf16") == "sdpa"


def test_bench_times_transformers_beside_ours(capsys):
    pytest.importorskip("transformers")
    args = ["bench", "--preset", "smoke", "--device", "cpu", "--batch-size", "4", "--steps", "1", "--warmup", "1"]
    assert main([*args, "--mode", "pretrain", "--peers", "--baseline", "--json"]) == 0
    rows = {r["design"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows.keys() == {"baseline", "mae-torch", "transformers"} and rows["transformers"]["img_per_s"] > 0
    assert rows["transformers"]["precision"] == rows["mae-torch"]["precision"]
    # the same shapes: like the starting design, transformers predicts every patch (training skips the visible)
    assert rows["transformers"]["gflop_per_img"] == pytest.approx(rows["baseline"]["gflop_per_img"], rel=0.05)
    assert rows["mae-torch"]["gflop_per_img"] < rows["baseline"]["gflop_per_img"]
    assert {r["machine"] for r in rows.values()} == {machine(CPU)}
    assert main([*args, "--mode", "pretrain", "--peers"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"machine: {machine(CPU)}\n") and "pretraining speed-up over transformers' ViTMAE" in out


@pytest.mark.parametrize("features", [True, False])
def test_bench_names_the_cpu_kind_and_the_kernel_limits_set(monkeypatch, features):
    for name in CPU_FEATURES:
        monkeypatch.setattr(torch.cpu, f"_is_{name}_supported", lambda: features, raising=False)
    for name in KERNEL_LIMITS:
        monkeypatch.delenv(name, raising=False)
    if features:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    text = machine(CPU)
    assert text.startswith(cpu_model()) and text.endswith(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if features:
        assert "(avx2 avx512 avx512_bf16 amx_tile), limited by ONEDNN_MAX_CPU_ISA=AVX2;" in text
    else:
        assert "(none of avx2 avx512 avx512_bf16 amx_tile);" in text and "limited" not in text
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert machine(torch.device("cuda")).startswith("NVIDIA H200; torch ")  # a GPU by its name, no CPU flags


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_device_prefers_cuda_then_an_apple_gpu_then_the_cpu(monkeypatch, cuda, mps, expected):
    from mae_torch.errors import MAEError
    from mae_torch.runtime import resolve_device, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto").type == expected
    assert resolve_precision("auto", torch.device("mps")) == "fp32"  # fp16 on request only
    assert resolve_precision("fp16", torch.device("mps")) == "fp16"
    for name, ok in (("mps", mps), ("cuda", cuda)):
        if not ok:
            with pytest.raises(MAEError, match=f"device {name} asked for but .* use --device cpu"):
                resolve_device(name)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "limit", "expected"),
    [
        (True, False, None, "bf16"),
        (False, True, None, "bf16"),
        (False, False, None, "fp32"),
        (True, True, "AVX2", "fp32"),
        (True, False, "avx512_core_bf16", "bf16"),
    ],
)
def test_auto_cpu_precision_is_bf16_only_where_onednn_may_use_bf16_units(
    monkeypatch, avx512_bf16, amx, limit, expected
):
    from mae_torch.runtime import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if limit is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:  # the user limited oneDNN: its bf16 products would be emulated, many times slower than fp32
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
