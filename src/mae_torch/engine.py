"""The training engine: one loop for pretraining and fine-tuning that knows nothing about MAE.

Design decisions:
- A `Task` hands the loop a model, a training loss, per-batch validation sums and an end-of-epoch hook;
  pretraining and fine-tuning differ only there (see tasks.py).
- The learning rate is a pure function of the optimizer step (`lr_at`): linear warmup, then cosine, set per
  iteration. Gradient accumulation reaches the effective batch; `device_batch_size` is what fits in memory.
- No host-device sync inside the step: losses are summed on the device and read once per epoch (the
  progress bar reads them every `SYNC_EVERY` steps). Images travel as uint8 and are normalized on the device.
- Validation runs with a fixed RNG seed (so MAE's validation masks, hence its loss, compare across epochs)
  without disturbing the training RNG stream.
- The data order of epoch e is a permutation seeded by (seed, e), so a resumed run sees the same batches.
- Every epoch writes `model.safetensors` + `model.json`, the best weights by the monitored metric, and last
  `checkpoint.pt` (everything a resume needs), each atomically: a crash leaves the last good files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # text bars: they work in terminals and notebooks without ipywidgets

from .augment import augment
from .config import Config
from .errors import MAEError
from .log import RunLogger, fmt_time
from .memdata import DeviceBatches, in_memory
from .vit import set_attention

SYNC_EVERY = 25  # optimizer steps between progress-bar refreshes (each one reads the loss: a host sync)


@dataclass
class Task:
    model: nn.Module
    train_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y) -> loss
    eval_sums: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]  # sums over batch
    meta: dict  # what model.json records: architecture, model config, class names
    on_epoch_end: Callable[[int, RunLogger], None] | None = None


# ---------------------------------------------------------------- pure pieces


def lr_at(step: int, total: int, warmup: int, peak: float, minimum: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then half-cosine down to `minimum` at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms (1-D), position embeddings and tokens; frozen ones left out."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EarlyStopper:
    """Counts epochs without an improvement of at least `min_delta`; its state goes into checkpoints."""

    def __init__(self, mode: str, patience: int, min_delta: float = 0.0):
        self.sign = 1.0 if mode == "min" else -1.0
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad_epochs = math.inf, 0

    def update(self, value: float) -> bool:
        """Record an epoch's value; True when it is a new best."""
        improved = self.sign * value < self.best - self.min_delta
        if improved:
            self.best, self.bad_epochs = self.sign * value, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)`, flush to disk, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o644)  # shared weights are readable by others, whatever mode the writer chose
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: nn.Module, meta: dict, path: Path) -> None:
    """Weights for sharing: safetensors, with the model description in its metadata and in a JSON beside it."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"mae_torch": json.dumps(meta)}))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))


# ---------------------------------------------------------------- device and precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MAEError(f"device {name} asked for but CUDA is not available; use --device cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def resolve_attention(name: str, device: torch.device) -> str:
    return name if name != "auto" else ("sdpa" if device.type == "cuda" else "math")


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


class Normalizer:
    """uint8 images -> normalized floats on the device (cheaper than converting on the host)."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.mean.device, non_blocking=True).float() - self.mean) / self.std


def make_loader(ds: Dataset, batch: int, workers: int, device: torch.device, order=None) -> DataLoader:
    """Batches of `ds` in the given order (else in order, keeping the last partial batch)."""
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=order,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=order is not None,
        generator=torch.Generator(),  # its own: drawing worker seeds must not shift the training RNG stream
    )


@torch.no_grad()
def evaluate(task: Task, loader: DataLoader, norm: Normalizer, precision: str, seed: int = 0) -> dict:
    """Mean of the task's validation sums over a loader, under a fixed seed (same masks every epoch)."""
    model, device = task.model, norm.mean.device
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    n = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for images, labels in loader:
            with autocast(device, precision):
                sums = task.eval_sums(model, norm(images), labels.to(device, non_blocking=True))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0) + v.float()
            n += len(images)
    model.train(was_training)
    if n == 0:
        raise MAEError("the evaluation split has no images; add images to it")
    return {k: v.item() / n for k, v in totals.items()} | {"n": n}


# ---------------------------------------------------------------- the loop


def fit(task: Task, train_ds: Dataset, val_ds: Dataset, cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Train `task.model` on train_ds, validating on val_ds each epoch; returns the last epoch's metrics."""
    tc, rc = cfg.train, cfg.run
    device = resolve_device(rc.device)
    precision = resolve_precision(rc.precision, device)
    model = task.model.to(device)
    attention = resolve_attention(rc.attention, device)
    set_attention(model, attention)
    if len(val_ds) == 0:
        raise MAEError("no validation images (--val-fraction 0 and no PATH/val); set --val-fraction above 0")
    steps_per_epoch = len(train_ds) // tc.batch_size
    if steps_per_epoch == 0:
        raise MAEError(
            f"the training split has {len(train_ds)} images, fewer than one batch of {tc.batch_size}; "
            "lower --batch-size or add images"
        )
    total_steps, warmup_steps = tc.epochs * steps_per_epoch, round(tc.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.peak_lr, betas=tc.betas, fused=device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    stopper = EarlyStopper("max" if tc.monitor == "val_acc" else "min", tc.patience, tc.min_delta)
    norm = Normalizer(cfg.model.mean, cfg.model.std, device)
    logger = RunLogger(run_dir)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)  # also on resume: it may extend --epochs
    atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    start_epoch, step = 0, 0
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        stopper.load_state_dict(ckpt["stopper"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        if stopper.should_stop:  # it stopped early; a larger --patience lets it go on
            logger.print(f"{run_dir} stopped early at epoch {start_epoch}; raise --patience to continue it")
            start_epoch = tc.epochs
        logger.print(f"resumed {run_dir} at epoch {start_epoch}, step {step}")
    else:
        torch.manual_seed(rc.seed)

    n_params = sum(p.numel() for p in model.parameters())
    logger.print(
        f"{cfg.command}: {len(train_ds)} train / {len(val_ds)} val images | {n_params / 1e6:.2f}M parameters | "
        f"device {device}, precision {precision}, attention {attention}\n"
        f"  batch {tc.batch_size} = {tc.micro_batch} x {tc.accum_steps} accumulation | "
        f"lr {tc.peak_lr:.3g} = blr {tc.blr:g} x {tc.batch_size}/256 | {steps_per_epoch} steps/epoch, "
        f"{total_steps} total, {warmup_steps} warmup | monitor {tc.monitor}"
        + (f", patience {tc.patience}" if tc.patience else "")
    )
    train_mem = in_memory(train_ds, device, rc.num_workers) if rc.in_memory else None
    val_mem = in_memory(val_ds, device, rc.num_workers) if train_mem is not None else None
    train_dev = DeviceBatches(train_mem, device) if train_mem is not None else None
    val_dev = DeviceBatches(val_mem, device) if val_mem is not None else None
    logger.print(f"  data: {'uint8 tensors on ' + str(device) if train_dev else 'DataLoader'}")
    step_fn = torch.compile(model) if rc.compile else model
    val_loader = make_loader(val_ds, tc.micro_batch, rc.num_workers, device)
    metrics: dict = {}
    step_time = None  # moving average of seconds per optimizer step, for the run ETA
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        g = torch.Generator().manual_seed(rc.seed * 100_003 + epoch)
        order = torch.randperm(len(train_ds), generator=g)[: steps_per_epoch * tc.batch_size]
        if train_dev:
            loader = train_dev.batches(order, tc.micro_batch)
        else:
            loader = make_loader(train_ds, tc.micro_batch, rc.num_workers, device, order.tolist())
        micro_steps = steps_per_epoch * tc.accum_steps
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(
            loader,
            total=micro_steps,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not logger.interactive,
        )
        t_epoch = t_step = time.perf_counter()
        for i, (images, labels) in enumerate(bar):
            with autocast(device, precision):
                x = augment(norm(images), tc.crop_scale, tc.hflip)
                loss = task.train_loss(step_fn, x, labels.to(device, non_blocking=True))
            scaler.scale(loss / tc.accum_steps).backward()
            loss_sum += loss.detach()
            if (i + 1) % tc.accum_steps:
                continue
            lr = lr_at(step, total_steps, warmup_steps, tc.peak_lr, tc.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            now = time.perf_counter()
            dt, t_step = now - t_step, now
            step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
            if step % SYNC_EVERY == 0 and logger.interactive:
                remaining = total_steps - step
                bar.set_postfix(
                    loss=f"{loss.item():.4f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{tc.batch_size / step_time:.0f}",
                    run_eta=fmt_time(remaining * step_time),
                )
        epoch_time = time.perf_counter() - t_epoch
        bar.close()
        batches = val_dev.batches(torch.arange(len(val_dev)), tc.micro_batch, False) if val_dev else val_loader
        val = evaluate(task, batches, norm, precision, rc.seed)
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum.item() / micro_steps,
            **{f"val_{k}": v for k, v in val.items() if k != "n"},
            "lr": lr,
            "img_per_s": steps_per_epoch * tc.batch_size / epoch_time,
            "epoch_time_s": epoch_time,
        }
        if tc.monitor not in metrics:
            raise MAEError(f"monitor {tc.monitor} is not measured by {cfg.command}; use val_loss")
        improved = stopper.update(metrics[tc.monitor])
        metrics["best"] = improved
        remaining = (tc.epochs - epoch - 1) * steps_per_epoch * (step_time or 0)
        logger.epoch(metrics, eta_s=remaining)
        if task.on_epoch_end:
            task.on_epoch_end(epoch, logger)
        if improved:
            save_weights(model, task.meta, run_dir / "best.safetensors")
        save_weights(model, task.meta, run_dir / "model.safetensors")
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "stopper": stopper.state_dict(),
            "epoch": epoch,
            "step": step,
            "config": cfg.to_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            },
        }
        atomic_write(ckpt_path, lambda tmp, state=state: torch.save(state, tmp))
        if stopper.should_stop:
            logger.print(f"early stop: {tc.monitor} did not improve by {tc.min_delta} for {tc.patience} epochs")
            break
    logger.close()
    return metrics
