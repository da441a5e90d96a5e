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
  Under torchrun each process takes its slice of every global batch (DDP averages the gradients, with
  `no_sync` while accumulating); process r seeds its RNG with seed + r; only rank 0 logs and writes.
- Every epoch (and every `save_every` steps) writes `checkpoint.pt`: everything a resume needs, down to the
  position inside the epoch and every process's RNG state, so a killed run resumes to the same weights.
  Files are written atomically: a crash, or a full disk, leaves the last good ones.
- A non-finite loss is counted on the device; the gradient scaler skips the update of such a step (no
  sync), and the run stops, naming the step, once more than `skip_nonfinite` were seen. Checks happen at the
  progress-bar syncs and before every checkpoint, so no checkpoint ever holds a bad step beyond that budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm  # text bars: they work in terminals and notebooks without ipywidgets

from .config import Config
from .datapath import DataPath
from .dist import Dist, setup
from .errors import MAEError
from .log import RunLogger, fmt_time
from .runtime import (
    Normalizer,
    atomic_write,
    autocast,
    load_state,
    resolve_attention,
    resolve_device,
    resolve_precision,
    save_weights,
)
from .vit import set_attention

SYNC_EVERY = 25  # optimizer steps between progress-bar refreshes (each one reads the loss: a host sync)


@dataclass
class Task:
    model: nn.Module
    train_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y) -> loss
    eval_sums: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]  # sums over batch
    meta: dict  # what model.json records: architecture, model config, class names
    on_epoch_end: Callable[[int, RunLogger], dict | None] | None = None  # rank 0; may add metrics


# ---------------------------------------------------------------- pure pieces


def lr_at(step: int, total: int, warmup: int, peak: float, minimum: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then half-cosine down to `minimum` at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on biases, norms (1-D) and the names in `model.no_weight_decay()` (positions; the
    CLS token of a classifier, as the official fine-tuning); frozen ones left out.

    layer_decay < 1: timm's layer-wise lr decay (BEiT, the paper's fine-tuning): block i's lr is scaled by
    layer_decay^(depth - i), the embeddings' by layer_decay^(depth + 1); groups carry `lr_scale`."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay < 1:
        return param_groups_layer_decay(model, weight_decay, skip, layer_decay=layer_decay)
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


@torch.no_grad()
def evaluate(
    task: Task, batches, norm: Normalizer, precision: str, seed: int = 0, group: Dist | None = None, model=None
) -> dict:
    """Mean of the task's validation sums over (this process's share of) the batches, under a fixed seed;
    `model` replaces task.model (e.g. its EMA)."""
    model, device, group = model or task.model, norm.mean.device, group or Dist()
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    n = torch.zeros((), device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for images, labels in batches:
            with autocast(device, precision):
                sums = task.eval_sums(model, norm(images), labels.to(device, non_blocking=True))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0) + v.float()
            n += len(images)
    model.train(was_training)
    n = int(group.sum_(n).item())
    if n == 0:
        raise MAEError("the evaluation split has no images; add images to it")
    return {k: group.sum_(v).item() / n for k, v in sorted(totals.items())} | {"n": n}


def scaler_for(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; for bf16 and fp32 a scale fixed at 1 still finds non-finite gradients and,
    with a fused optimizer, skips that step's update on the device."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)  # powers of 2: exact


# ---------------------------------------------------------------- the loop


def fit(task: Task, train_ds: Dataset, val_ds: Dataset, cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Train `task.model` on train_ds, validating on val_ds each epoch; returns the last epoch's metrics."""
    tc, rc = cfg.train, cfg.run
    group, device_name = setup(rc.device)
    device = resolve_device(device_name)
    precision = resolve_precision(rc.precision, device)
    if len(val_ds) == 0:
        raise MAEError("no validation images (--val-fraction 0 and no PATH/val); set --val-fraction above 0")
    if tc.batch_size % (group.world * tc.micro_batch):
        raise MAEError(
            f"batch_size {tc.batch_size} must be a multiple of {group.world} processes x device_batch_size "
            f"{tc.micro_batch}; change --batch-size or --device-batch-size"
        )
    per_rank = tc.batch_size // group.world
    accum = per_rank // tc.micro_batch
    steps_per_epoch = len(train_ds) // tc.batch_size
    if steps_per_epoch == 0:
        raise MAEError(
            f"the training split has {len(train_ds)} images, fewer than one batch of {tc.batch_size}; "
            "lower --batch-size or add images"
        )
    total_steps, warmup_steps = tc.epochs * steps_per_epoch, round(tc.warmup_epochs * steps_per_epoch)
    model = task.model.to(device)
    attention = resolve_attention(rc.attention, device)
    set_attention(model, attention)
    ddp = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if group.world > 1
        else model
    )
    forward = torch.compile(ddp) if rc.compile else ddp
    optimizer = torch.optim.AdamW(
        param_groups(model, tc.weight_decay, tc.layer_decay),
        lr=tc.peak_lr,
        betas=tc.betas,
        fused=device.type in ("cpu", "cuda"),
    )
    scaler = scaler_for(device, precision)
    ema = ModelEmaV3(model, decay=tc.ema_decay) if tc.ema_decay else None  # validated and saved instead
    judged = ema.module if ema else model
    stopper = EarlyStopper("max" if tc.monitor == "val_acc" else "min", tc.patience, tc.min_delta)
    norm = Normalizer(cfg.model.mean, cfg.model.std, device)
    logger = RunLogger(run_dir, active=group.main)
    if group.main:
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)  # also on resume: it may extend --epochs
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))

    start_epoch, step, done, carried = 0, 0, 0, 0.0  # done: optimizer steps of start_epoch already made
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        try:  # weights_only: a checkpoint is data; a pickle that wants to run code is refused
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not a usable checkpoint"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MAEError(f"cannot load {ckpt_path} as plain data ({first[:150]}); it was not run") from None
        load_state(model, ckpt["model"], str(ckpt_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        stopper.load_state_dict(ckpt["stopper"])
        if ema:
            load_state(ema.module, ckpt["ema"], f"the EMA weights of {ckpt_path}")
        mine = group.rank if len(ckpt["rng"]["torch"]) == group.world else 0
        torch.set_rng_state(ckpt["rng"]["torch"][mine])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][mine], device)
        start_epoch, step, done = ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]
        carried = ckpt["loss_sum"][mine] if done < steps_per_epoch else 0.0
        if done >= steps_per_epoch:
            start_epoch, done = start_epoch + 1, 0
        logger.truncate_metrics(start_epoch)  # epochs logged after the checkpoint will be logged again
        if stopper.should_stop:  # it stopped early; a larger --patience lets it go on
            logger.print(f"{run_dir} stopped early at epoch {start_epoch}; raise --patience to continue it")
            start_epoch = tc.epochs
        logger.print(f"resumed {run_dir} at epoch {start_epoch + 1}, step {step}")
    else:
        torch.manual_seed(rc.seed + group.rank)

    data = DataPath(train_ds, val_ds, cfg.model, tc, device, rc.num_workers, rc.in_memory)
    n_params = sum(p.numel() for p in model.parameters())
    logger.print(
        f"{cfg.command}: {len(train_ds)} train / {len(val_ds)} val images | {n_params / 1e6:.2f}M parameters | "
        f"device {device}{f' x {group.world} processes' if group.world > 1 else ''}, precision {precision}, "
        f"attention {attention}, data {data.describe}\n"
        f"  batch {tc.batch_size} = {group.world} x {tc.micro_batch} x {accum} accumulation | "
        f"lr {tc.peak_lr:.3g} = blr {tc.blr:g} x {tc.batch_size}/256 | {steps_per_epoch} steps/epoch, "
        f"{total_steps} total, {warmup_steps} warmup | monitor {tc.monitor}"
        + (f", patience {tc.patience}" if tc.patience else "")
    )
    val_share = torch.arange(group.rank, len(val_ds), group.world)  # each process validates its share
    n_bad = torch.zeros((), device=device, dtype=torch.long)  # non-finite losses seen by this process
    first_bad = torch.full((), -1, device=device, dtype=torch.long)

    def check_finite() -> None:
        if group.sum_(n_bad.clone()).item() > rc.skip_nonfinite:
            at = int(group.sum_(torch.where(first_bad < 0, 0, first_bad + 1)).item()) - 1  # rank 0's or any
            raise MAEError(
                f"non-finite loss at step {max(at, 0)} (more than --skip-nonfinite {rc.skip_nonfinite}); the last "
                f"good checkpoint is kept: lower --blr or check the data, then --resume {run_dir}"
            )

    def save(epoch: int, done: int, loss_sum: torch.Tensor) -> None:
        check_finite()
        rng = {
            "torch": group.gather(torch.get_rng_state()),
            "cuda": group.gather(torch.cuda.get_rng_state(device)) if device.type == "cuda" else [],
        }
        losses = group.gather(loss_sum.item())
        if group.main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "stopper": stopper.state_dict(),
                "epoch": epoch,
                "epoch_step": done,
                "step": step,
                "loss_sum": losses,
                "rng": rng,
                "config": cfg.to_dict(),
                **({"ema": ema.module.state_dict()} if ema else {}),
            }
            atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
        group.barrier()

    metrics: dict = {}
    step_time = None  # moving average of seconds per optimizer step, for the run ETA
    micro_steps = steps_per_epoch * accum
    try:
        for epoch in range(start_epoch, tc.epochs):
            model.train()
            g = torch.Generator().manual_seed(rc.seed * 100_003 + epoch)
            order = torch.randperm(len(train_ds), generator=g)[: steps_per_epoch * tc.batch_size]
            order = order.view(steps_per_epoch, group.world, per_rank)[:, group.rank].flatten()  # this process's
            order = order[done * per_rank :]  # skip what a resumed run already did
            loader = data.train_batches(order, tc.micro_batch)
            loss_sum = torch.tensor(carried, device=device)  # sum of micro-batch losses this epoch
            carried = 0.0
            bar = tqdm(
                loader,
                total=(steps_per_epoch - done) * accum,
                desc=f"epoch {epoch + 1}/{tc.epochs}",
                leave=False,
                dynamic_ncols=True,
                disable=not logger.interactive,
            )
            t_epoch = t_step = time.perf_counter()
            epoch_start_step = step
            for i, (images, labels) in enumerate(bar):
                last = (i + 1) % accum == 0
                with ddp.no_sync() if group.world > 1 and not last else nullcontext():
                    with autocast(device, precision):
                        x = data.augment(images, norm)
                        loss = task.train_loss(forward, x, labels.to(device, non_blocking=True)).float()
                    scaler.scale(loss / accum).backward()
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach(), 0.0)
                n_bad += (~finite).long()
                first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
                if not last:
                    continue
                lr = lr_at(step, total_steps, warmup_steps, tc.peak_lr, tc.min_lr)
                for group_ in optimizer.param_groups:
                    group_["lr"] = lr * group_.get("lr_scale", 1.0)
                scaler.step(optimizer)  # with a fused optimizer: skips a non-finite step without a host sync
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    ema.update(model, step)
                step, done = step + 1, done + 1
                now = time.perf_counter()
                dt, t_step = now - t_step, now
                step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
                if step % SYNC_EVERY == 0:
                    check_finite()
                    if logger.interactive:
                        bar.set_postfix(
                            loss=f"{loss.item():.4f}",
                            lr=f"{lr:.2e}",
                            img_s=f"{tc.batch_size / step_time:.0f}",
                            run_eta=fmt_time((total_steps - step) * step_time),
                        )
                if rc.save_every and step % rc.save_every == 0 and done < steps_per_epoch:
                    save(epoch, done, loss_sum)
            epoch_time = time.perf_counter() - t_epoch
            bar.close()
            check_finite()
            val = evaluate(task, data.val_batches(val_share, tc.micro_batch), norm, precision, rc.seed, group, judged)
            metrics = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": group.sum_(loss_sum.clone()).item() / (micro_steps * group.world),
                **{f"val_{k}": v for k, v in val.items() if k != "n"},
                "lr": lr_at(step - 1, total_steps, warmup_steps, tc.peak_lr, tc.min_lr),
                "img_per_s": (step - epoch_start_step) * tc.batch_size / epoch_time,
                "epoch_time_s": epoch_time,
                **({"skipped_images": data.skipped()} if rc.skip_bad_images else {}),
            }
            improved = stopper.update(metrics[tc.monitor])
            metrics["best"] = improved
            if group.main and task.on_epoch_end:
                metrics.update(task.on_epoch_end(epoch, logger) or {})  # e.g. a k-NN accuracy
            logger.epoch(metrics, eta_s=(tc.epochs - epoch - 1) * steps_per_epoch * (step_time or 0))
            if group.main:
                if improved:
                    save_weights(judged, task.meta, run_dir / "best.safetensors")
                save_weights(judged, task.meta, run_dir / "model.safetensors")
            save(epoch, steps_per_epoch, loss_sum)
            done = 0
            if stopper.should_stop:
                logger.print(f"early stop: {tc.monitor} did not improve by {tc.min_delta} for {tc.patience} epochs")
                break
    finally:
        data.close()  # DataLoader workers end with the run, also when it fails
    logger.close()
    return metrics
