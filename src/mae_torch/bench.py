"""`mae bench`: throughput of the training step, counted FLOPs, and the speed-up over the plain way.

Design decisions:
- A step is what training does: a uint8 batch indexed from images held on the device -> normalize
  (-> augment) -> forward -> backward -> AdamW update (training's `optim.adamw` and gradient scaler), timed
  after warm-up with one device sync per timed block, never per step. The batch-making part is also timed
  alone ("data", a share of the step).
- FLOPs come from `torch.utils.flop_counter` on one step, with attention forced to the math kernel while
  counting so its matrix products are seen; achieved TFLOP/s = FLOPs per image x img/s.
- The peak is measured, not looked up: the best of a few large matrix products in the same precision.
- `--data FOLDER` also times the streaming data path alone (listing, then decoding and augmenting in
  DataLoader workers, the batch on the device) at the preset's size, beside the model step, so a user sees
  whether the accelerator would wait on data.
- `--peers` also times transformers' ViTMAEForPreTraining (SDPA attention, fused AdamW: its Trainer's default
  with torch >= 2.8) on the same shapes, in the same precision and process, when transformers is installed.
- `--baseline` also times the starting project's design on the same shapes in the same process (fp32, eager,
  masks from per-sample shuffles on the host, PyTorch's default AdamW), so the speed-up is a ratio measured in
  one run.
- Every result names the machine (`machine`): the GPU, or the CPU's model, the instruction sets that decide its
  fast path (PyTorch's detection) and any limits set on ATen's, oneDNN's or MKL's kernels, so a figure is never
  separated from the CPU kind it was measured on.
- The baseline and the peers run first, with the C library's allocator defaults, as their users get them;
  mae-torch's rows run after `runtime.keep_freed_memory`, as its training does on CPUs (it stays set for the
  rest of the process, so the order matters).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .augment import Augment
from .config import Config, resolve
from .convert import hf_config
from .data import TensorImages, build_datasets
from .data.memory import DeviceBatches
from .data.path import DataPath
from .models import build_mae, build_vit
from .optim import adamw, fused_adamw_on, param_groups, scaler_for
from .runtime import (
    CPU_FEATURES,
    Normalizer,
    autocast,
    cpu_features,
    keep_freed_memory,
    resolve_attention,
    resolve_device,
    resolve_precision,
)
from .tasks import classification_loss, finetune_mixing
from .vit import set_attention

KERNEL_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def machine(device: torch.device) -> str:
    """What a figure was measured on: the GPU's name, or the CPU's model, which of CPU_FEATURES it has and the
    kernel limits set in the environment; then torch's version and threads."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        what = f"Apple GPU (MPS) of {cpu_model()}"
    else:
        found = [f for f in CPU_FEATURES if f in cpu_features()]
        limits = [f"{k}={os.environ[k]}" for k in KERNEL_LIMITS if k in os.environ]
        what = f"{cpu_model()} ({' '.join(found) or 'none of ' + ' '.join(CPU_FEATURES)})"
        what += f", limited by {' '.join(limits)}" if limits else ""
    return f"{what}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak(device: torch.device, precision: str) -> float:
    """Best TFLOP/s of a large square matrix product in the step's precision."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def make_step(
    mode: str,
    preset: str | Config,
    batch: int,
    device: torch.device,
    precision: str,
    design: str = "mae-torch",
    compile: bool = False,
    attention: str = "auto",
    augmented: bool = False,
):
    """A closure running one training step on a fixed random uint8 batch, and the batch-making cost alone.
    `preset`: a preset's name or a resolved Config; `augmented`: with the config's training augmentation
    (crop, translation, flip, RandAugment, erasing; mixup/cutmix, label smoothing and the EMA when
    fine-tuning), else the bare step.

    design: "mae-torch", "baseline" (the starting project's masking, timm's SDPA blocks) or "transformers"
    (transformers' ViTMAEForPreTraining of the same architecture, SDPA attention, its own masking)."""
    cfg = resolve(mode, preset) if isinstance(preset, str) else preset
    tc = cfg.train
    if design == "transformers":
        from transformers import ViTMAEForPreTraining  # optional: only `mae bench --peers` needs it

        model = ViTMAEForPreTraining._from_config(hf_config(cfg.model), attn_implementation="sdpa").to(device)
    else:
        model = (build_mae(cfg.model) if mode == "pretrain" else build_vit(cfg.model, 10)).to(device)
        kernel = "sdpa" if design == "baseline" else resolve_attention(attention, device, precision)
        set_attention(model, kernel)  # the baseline: timm's default
    forward = torch.compile(model) if compile else model
    if design == "mae-torch":  # training's optimizer and gradient scaler
        opt, scaler = adamw(model, tc, device), scaler_for(device, precision)
    else:  # as their users get it: plain AdamW (the starting project), fused (transformers' Trainer default)
        fused = design == "transformers" and fused_adamw_on(device)
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=fused)
        scaler = torch.amp.GradScaler(device.type, enabled=False)  # a pass-through
    m = cfg.model
    pool = torch.randint(0, 256, (4 * batch, m.in_chans, m.img_size, m.img_size), dtype=torch.uint8)
    data_set = DeviceBatches(TensorImages(pool, torch.randint(0, 10, (4 * batch,))), device)  # as in training
    norm = Normalizer(m.mean, m.std, device)
    num_patches = (cfg.model.img_size // cfg.model.patch_size) ** 2
    rng = np.random.default_rng(0)

    aug = Augment(tc.crop_scale, tc.hflip, tc.randaugment, tc.reprob, device, tc.translate) if augmented else Augment()
    mix = finetune_mixing(tc, 10) if augmented and mode == "finetune" else None
    smoothing = tc.label_smoothing if augmented else 0.0
    ema = ModelEmaV3(model, decay=tc.ema_decay) if augmented and tc.ema_decay else None

    def data():
        images, labels = next(data_set.batches(torch.randperm(len(data_set))[:batch], batch))
        return aug(images, norm), labels

    def step():
        x, labels = data()
        with autocast(device, precision):
            if mode == "finetune":
                loss = classification_loss(forward, x, labels, mix, smoothing)
            elif design == "transformers":
                loss = forward(pixel_values=x).loss
            elif design == "baseline":  # the starting project: a numpy shuffle per sample on the host
                perm = np.stack([rng.permutation(num_patches) for _ in range(batch)])
                noise = torch.from_numpy(np.argsort(perm, axis=1) / num_patches).float().to(device)
                loss = forward(x, noise=noise).loss
            else:
                loss = forward(x, pred_visible=False).loss  # as training
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema:
            ema.update(model)

    return step, data


def make_eval_step(mode: str, cfg: Config, batch: int, device: torch.device, precision: str):
    """A closure running one validation batch of the stage's model (no gradients, eval mode), as training
    validates: the MAE's loss with its masking, or the classifier's logits (twice with flip test-time
    augmentation)."""
    m = cfg.model
    model = (build_mae(m) if mode == "pretrain" else build_vit(m, 10)).to(device).eval()
    set_attention(model, resolve_attention(cfg.run.attention, device, precision))
    x = Normalizer(m.mean, m.std, device)(torch.randint(0, 256, (batch, m.in_chans, m.img_size, m.img_size)))
    passes = 2 if mode == "finetune" and cfg.train.tta_flip else 1

    @torch.no_grad()
    def step():
        with autocast(device, precision):
            for _ in range(passes):
                model(x, pred_visible=False) if mode == "pretrain" else model(x)

    return step


def time_it(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call after warm-up; the device is synchronized once around the timed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def bench(
    preset: str,
    batch: int = 128,
    steps: int = 5,
    warmup: int = 2,
    device: str = "auto",
    precision: str = "auto",
    baseline: bool = False,
    compile: bool = False,
    modes=("pretrain", "finetune"),
    attention: str = "auto",
    augmented: bool = False,
    peers: bool = False,
):
    """Yield one result dict per measured configuration; `peers`: transformers' ViTMAE too, same precision;
    `augmented`: each step also with the preset's training augmentation, after the bare one."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    peaks = {}
    runs = [("pretrain", "fp32", "baseline", False, False)] if baseline else []
    if peers:
        runs.append(("pretrain", prec, "transformers", False, False))
    # last: they keep freed memory on CPUs
    runs += [(mode, prec, "mae-torch", compile, aug) for mode in modes for aug in (False, True)[: 1 + augmented]]
    kept, where = False, machine(dev)
    for mode, p, design, comp, aug in runs:
        base = design != "mae-torch"
        if not base and dev.type == "cpu" and not kept:
            kept = keep_freed_memory()  # as training does; the other designs ran with the C library's defaults
        step, data = make_step(mode, preset, batch, dev, p, design, comp, attention, aug)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            step()
        flops = counter.get_total_flops() / batch
        seconds = time_it(step, dev, steps, warmup)
        data_s = time_it(data, dev, steps, 1)
        if p not in peaks:
            peaks[p] = measured_peak(dev, p)
        tflops = flops * batch / seconds / 1e12
        yield {
            "mode": mode,
            "design": design,
            "preset": preset,
            "batch": batch,
            "device": str(dev),
            "precision": p,
            "compile": comp,
            "attention": "sdpa" if base else resolve_attention(attention, dev, p),
            "augmented": aug,
            "img_per_s": batch / seconds,
            "ms_per_step": seconds * 1e3,
            "gflop_per_img": flops / 1e9,
            "tflop_per_s": tflops,
            "peak_tflop_per_s": peaks[p],
            "fraction_of_peak": tflops / peaks[p],
            "data_fraction": data_s / seconds,
            "threads": torch.get_num_threads(),
            "machine": where,
            "kept_freed_memory": kept and not base,
        }


def data_throughput(
    folder: str, preset: str, mode: str, batch: int, steps: int, warmup: int, device: str, workers: int
) -> dict:
    """img/s of the streaming path of `folder` as training reads it (the preset's augmentation for `mode`)."""
    cfg = resolve(mode, preset)
    dev = resolve_device(device)
    t = time.perf_counter()
    train, val, _ = build_datasets(folder, data_root=None, img_size=cfg.model.img_size, val_fraction=0.01)
    listing = time.perf_counter() - t
    path = DataPath(train, val, cfg.model, cfg.train, dev, workers, mem=False)
    norm = Normalizer(cfg.model.mean, cfg.model.std, dev)
    order = torch.randint(len(train), ((steps + warmup) * batch,))  # a small folder is read more than once
    batches = iter(path.train_batches(order, batch))
    try:
        for _ in range(warmup):
            path.augment(next(batches)[0], norm)
        sync(dev)
        t = time.perf_counter()
        done = 0
        for images, _ in batches:
            path.augment(images, norm)
            done += len(images)
        sync(dev)
    finally:
        path.close()
    seconds = time.perf_counter() - t
    return {
        "mode": mode,
        "design": "data",
        "preset": preset,
        "folder": folder,
        "files": len(train) + len(val),
        "listing_s": listing,
        "batch": batch,
        "workers": workers,
        "device": str(dev),
        "img_per_s": done / seconds if done else 0.0,
    }


def describe(r: dict) -> str:
    if r["design"] == "data":
        return (
            f"{r['mode']:>8}      data | {r['folder']}: {r['files']} images listed in {r['listing_s']:.1f} s; decoded "
            f"and augmented by {r['workers']} workers at {r['preset']}'s size: {r['img_per_s']:.1f} img/s"
        )
    return (
        f"{r['mode']:>8} {r['design']:>9} | {r['preset']} batch {r['batch']} {r['precision']} on {r['device']}"
        f" {r['attention']} attention{' compiled' if r['compile'] else ''}"
        f"{' augmented' if r['augmented'] else ''}{', freed memory kept' if r.get('kept_freed_memory') else ''}: "
        f"{r['img_per_s']:.1f} img/s, {r['ms_per_step']:.0f} ms/step, "
        f"{r['gflop_per_img']:.2f} GFLOP/img, {r['tflop_per_s']:.3f} TFLOP/s = {r['fraction_of_peak']:.0%} of "
        f"the measured {r['peak_tflop_per_s']:.3f} peak, data {r['data_fraction']:.1%} of the step"
    )
