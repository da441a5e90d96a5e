"""The training engine: one loop for pretraining and fine-tuning that knows nothing about MAE.

Design decisions:
- A `Task` hands the loop a model, a training loss, per-batch validation sums and an end-of-epoch hook;
  pretraining and fine-tuning differ only there (see tasks.py).
- The learning rate is a pure function of the optimizer step (`optim.lr_at`), set per iteration. Gradient
  accumulation reaches the effective batch; `device_batch_size` is what fits in memory.
- No host-device sync inside the step: losses are summed on the device and read once per epoch (the
  progress bar reads them every `SYNC_EVERY` steps). Images travel as uint8 and are normalized on the device.
- Validation runs with a fixed RNG seed (so MAE's validation masks, hence its loss, compare across epochs)
  without disturbing the training RNG stream.
- The data order of epoch e is a permutation seeded by (seed, e), so a resumed run sees the same batches;
  with it each image gets an augmentation seed, which the streaming path's workers use (data.stream.Seeded).
  Under torchrun each process takes its slice of every global batch (DDP averages the gradients, with
  `no_sync` while accumulating); process r seeds its RNG with seed + r; only rank 0 logs and writes.
- Every epoch (and every `save_every` steps) writes `checkpoint.pt`: everything a resume needs, down to the
  position inside the epoch and every process's RNG state, so a killed run resumes to the same weights.
  Files are written atomically: a crash, or a full disk, leaves the last good ones.
- `max_minutes` bounds a run's training time (validation and checkpoints included, resumed parts added up):
  an epoch that would not finish within it (by the last epoch's time) is not started, one that overruns stops
  at the bound; either way the run ends with the weights and checkpoint of its last finished epoch (which then
  records the whole time spent, so a resume under the same bound trains no further), and the returned metrics
  say `stopped: "time bound"`. With `fit_to_time`, a run that falls behind (a machine slower than planned)
  shortens its schedule instead, once the epochs left no longer fit at the run's typical pace (the median of
  its epochs so far, checked after each: another job slowing a few epochs does not cut the schedule as if
  every epoch left would be as slow; a lasting slowdown is caught as it falls further behind), so the learning
  rate anneals to min_lr by the bound rather than being cut off mid-schedule (`fitted_epochs` in the returned
  metrics; config.yaml and the checkpoint record the new epochs). `mae speedrun` sizes its stages this way.
- A non-finite loss is counted on the device; the gradient scaler skips the update of such a step (no
  sync), and the run stops, naming the step, once more than `skip_nonfinite` were seen. Checks happen at the
  progress-bar syncs and before every checkpoint, so no checkpoint ever holds a bad step beyond that budget.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm  # text bars: they work in terminals and notebooks without ipywidgets

from .config import Config
from .data.path import DataPath
from .dist import Dist, setup
from .errors import MAEError
from .log import RunLogger, fmt_time
from .optim import adamw, lr_at, scaler_for
from .runtime import (
    Normalizer,
    atomic_write,
    autocast,
    keep_freed_memory,
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


# ---------------------------------------------------------------- pieces

FIT_SLACK = 0.97  # fit_to_time plans into 97% of the time left: epochs vary by a few % on a shared machine


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


# ---------------------------------------------------------------- the loop


def fit(task: Task, train_ds: Dataset, val_ds: Dataset, cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Train `task.model` on train_ds, validating on val_ds each epoch; returns the last epoch's metrics and
    `seconds`, the run's training time (resumed parts added up)."""
    run = Trainer(task, train_ds, val_ds, cfg, Path(run_dir))
    if resume:
        run.restore()
    else:
        torch.manual_seed(cfg.run.seed + run.group.rank)
    run.data = DataPath(train_ds, val_ds, cfg.model, cfg.train, run.device, cfg.run.num_workers, cfg.run.in_memory)
    run.announce()
    metrics: dict = {}
    run.t_start = time.perf_counter()
    try:
        epoch = run.start_epoch
        while epoch < cfg.train.epochs:  # read each time round: fit_to_time may shorten the epochs on the way
            if run.out_of_time(run.epoch_seconds):
                break
            loss_sum, seconds, steps = run.train_epoch(epoch)
            if run.done < run.steps_per_epoch:  # stopped at the time bound mid-epoch: that epoch is not kept
                break
            metrics = run.end_epoch(epoch, loss_sum, seconds, steps)
            if run.stopper.should_stop:
                tc = cfg.train
                run.logger.print(f"early stop: {tc.monitor} did not improve by {tc.min_delta} for {tc.patience} epochs")
                break
            epoch += 1
    finally:
        run.data.close()  # DataLoader workers end with the run, also when it fails
    if run.stopped:
        run.record_time()
        run.logger.print(
            f"time bound: stopped after {run.elapsed() / 60:.2f} of --max-minutes {cfg.train.max_minutes:.2f}, "
            f"keeping epoch {metrics.get('epoch', run.start_epoch)} of {cfg.train.epochs}"
        )
        metrics = {**metrics, "stopped": "time bound"}
    run.logger.close()
    return {**metrics, "seconds": run.elapsed(), **({"fitted_epochs": run.fitted} if run.fitted else {})}


def epochs_that_fit(epochs: int, done: int, left_s: float, epoch_times: list[float]) -> int:
    """The epochs a time-bounded run can finish: the `done` ones plus as many more as the `left_s` seconds hold
    at the median of `epoch_times` (the epochs so far); never more than planned, never fewer than done (at
    least one)."""
    epoch_s = statistics.median(epoch_times) if epoch_times else 0.0
    if epoch_s <= 0:
        return epochs
    return max(1, done, min(epochs, done + int(max(left_s, 0.0) // epoch_s)))


class Trainer:
    """The state of one training run and its parts: set up, restore, one epoch, end of epoch, save."""

    def __init__(self, task: Task, train_ds: Dataset, val_ds: Dataset, cfg: Config, run_dir: Path):
        self.task, self.cfg, self.run_dir = task, cfg, run_dir
        self.n_train, self.n_val = len(train_ds), len(val_ds)
        tc, rc = cfg.train, cfg.run
        self.group, device_name = setup(rc.device)
        self.device = resolve_device(device_name)
        self.precision = resolve_precision(rc.precision, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults from re-mapping each step's activations
        self.check_sizes()
        self.per_rank = tc.batch_size // self.group.world
        self.accum = self.per_rank // tc.micro_batch
        self.steps_per_epoch = self.n_train // tc.batch_size
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.warmup_steps = round(tc.warmup_epochs * self.steps_per_epoch)
        self.model = task.model.to(self.device)
        self.attention = resolve_attention(rc.attention, self.device, self.precision)
        set_attention(self.model, self.attention)
        if rc.grad_checkpointing:  # timm's API: every block's activations recomputed in backward
            self.model.set_grad_checkpointing()
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.group.world > 1
            else self.model
        )
        self.forward = torch.compile(self.ddp) if rc.compile else self.ddp
        self.optimizer = adamw(self.model, tc, self.device)
        self.scaler = scaler_for(self.device, self.precision)
        self.ema = ModelEmaV3(self.model, decay=tc.ema_decay) if tc.ema_decay else None  # validated and saved
        self.judged = self.ema.module if self.ema else self.model
        self.stopper = EarlyStopper("max" if tc.monitor == "val_acc" else "min", tc.patience, tc.min_delta)
        self.norm = Normalizer(cfg.model.mean, cfg.model.std, self.device)
        self.logger = RunLogger(run_dir, active=self.group.main)
        if self.group.main:
            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)  # also on resume: it may extend --epochs
            atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        self.start_epoch, self.step, self.done, self.carried = 0, 0, 0, 0.0  # done: steps of start_epoch made
        self.n_bad = torch.zeros((), device=self.device, dtype=torch.long)  # non-finite losses seen here
        self.first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        self.step_time, self.t_step = None, 0.0  # moving average of seconds per optimizer step, for the run ETA
        self.seconds, self.t_start = 0.0, time.perf_counter()  # training time of earlier processes; this one's start
        self.epoch_seconds, self.stopped = 0.0, False  # the last whole epoch's time; set at the time bound
        self.epoch_times: list[float] = []  # every finished epoch's time (fit_to_time's pace), resumes included
        self.fitted = 0  # the epochs fit_to_time shortened the schedule to (0: not shortened)
        self.data: DataPath | None = None

    def check_sizes(self) -> None:
        tc, world = self.cfg.train, self.group.world
        if self.n_val == 0:
            raise MAEError("no validation images (--val-fraction 0 and no PATH/val); set --val-fraction above 0")
        if tc.batch_size % (world * tc.micro_batch):
            raise MAEError(
                f"batch_size {tc.batch_size} must be a multiple of {world} processes x device_batch_size "
                f"{tc.micro_batch}; change --batch-size or --device-batch-size"
            )
        if self.n_train < tc.batch_size:
            raise MAEError(
                f"the training split has {self.n_train} images, fewer than one batch of {tc.batch_size}; "
                "lower --batch-size or add images"
            )

    def restore(self) -> None:
        """Continue from checkpoint.pt: weights, optimizer, scaler, stopper, EMA, RNG states, position."""
        path, group = self.run_dir / "checkpoint.pt", self.group
        try:  # weights_only: a checkpoint is data; a pickle that wants to run code is refused
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not a usable checkpoint"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MAEError(f"cannot load {path} as plain data ({first[:150]}); it was not run") from None
        load_state(self.model, ckpt["model"], str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.stopper.load_state_dict(ckpt["stopper"])
        if self.ema:
            load_state(self.ema.module, ckpt["ema"], f"the EMA weights of {path}")
        mine = group.rank if len(ckpt["rng"]["torch"]) == group.world else 0
        torch.set_rng_state(ckpt["rng"]["torch"][mine])
        if self.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][mine], self.device)
        self.start_epoch, self.step, self.done = ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]
        self.seconds, self.epoch_seconds = ckpt.get("seconds", 0.0), ckpt.get("epoch_seconds", 0.0)
        self.epoch_times = list(ckpt.get("epoch_times", [self.epoch_seconds] if self.epoch_seconds else []))
        self.carried = ckpt["loss_sum"][mine] if self.done < self.steps_per_epoch else 0.0
        if self.done >= self.steps_per_epoch:
            self.start_epoch, self.done = self.start_epoch + 1, 0
        self.logger.truncate_metrics(self.start_epoch)  # epochs logged after the checkpoint are logged again
        if self.stopper.should_stop:  # it stopped early; a larger --patience lets it go on
            self.logger.print(f"{self.run_dir} stopped early at epoch {self.start_epoch}; raise --patience to continue")
            self.start_epoch = self.cfg.train.epochs
        self.logger.print(f"resumed {self.run_dir} at epoch {self.start_epoch + 1}, step {self.step}")

    def announce(self) -> None:
        """The derived values, printed once at start-up."""
        cfg, tc, group = self.cfg, self.cfg.train, self.group
        n_params = sum(p.numel() for p in self.model.parameters())
        lr_from = "--lr" if tc.lr > 0 else f"blr {tc.blr:g} x {tc.batch_size}/256"
        self.logger.print(
            f"{cfg.command}: {self.n_train} train / {self.n_val} val images | {n_params / 1e6:.2f}M parameters | "
            f"device {self.device}{f' x {group.world} processes' if group.world > 1 else ''}, precision "
            f"{self.precision}, attention {self.attention}, data {self.data.describe}\n"
            f"  batch {tc.batch_size} = {group.world} x {tc.micro_batch} x {self.accum} accumulation | "
            f"lr {tc.peak_lr:.3g} = {lr_from} | {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} total, {self.warmup_steps} warmup | monitor {tc.monitor}"
            + (f", patience {tc.patience}" if tc.patience else "")
        )

    def elapsed(self) -> float:
        """Seconds of training so far, resumed processes added up."""
        return self.seconds + time.perf_counter() - self.t_start

    def out_of_time(self, ahead: float = 0.0) -> bool:
        """True once the time bound (max_minutes) is reached, or would be within `ahead` more seconds; decided
        together by all processes (any one's clock counts), so they stop at the same step."""
        bound = self.cfg.train.max_minutes * 60
        if bound and not self.stopped:
            late = torch.tensor(float(self.elapsed() + ahead > bound), device=self.device)
            self.stopped = self.group.sum_(late).item() > 0
        return self.stopped

    def record_time(self) -> None:
        """At the time bound: the checkpoint (its last finished epoch) takes the run's whole training time, so
        a resume under the same bound trains no further."""
        path = self.run_dir / "checkpoint.pt"
        if self.group.main and path.exists():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            ckpt["seconds"] = self.elapsed()
            atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
        self.group.barrier()

    def lr(self, step: int) -> float:
        tc = self.cfg.train
        return lr_at(step, self.total_steps, self.warmup_steps, tc.peak_lr, tc.min_lr)

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, float, int]:
        """One epoch (or what a resumed one has left): (sum of micro-batch losses, seconds, optimizer steps)."""
        tc, rc, group = self.cfg.train, self.cfg.run, self.group
        self.model.train()
        g = torch.Generator().manual_seed(rc.seed * 100_003 + epoch)
        order = self.data.epoch_order(self.n_train, g)[: self.steps_per_epoch * tc.batch_size]
        both = torch.stack([order, torch.randint(2**62, order.shape, generator=g)], 1)  # + augmentation seeds
        both = both.view(self.steps_per_epoch, group.world, self.per_rank, 2)[:, group.rank].reshape(-1, 2)  # mine
        order, seeds = both[self.done * self.per_rank :].unbind(1)  # less what a resumed run already did
        loss_sum = torch.tensor(self.carried, device=self.device)  # sum of micro-batch losses this epoch
        self.carried = 0.0
        bar = tqdm(
            self.data.train_batches(order, tc.micro_batch, seeds),
            total=(self.steps_per_epoch - self.done) * self.accum,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not self.logger.interactive,
        )
        t_epoch = self.t_step = time.perf_counter()
        first_step = self.step
        for i, (images, labels) in enumerate(bar):
            loss = self.micro_step(images, labels, last=(i + 1) % self.accum == 0)
            loss_sum += torch.where(torch.isfinite(loss), loss, 0.0)
            if (i + 1) % self.accum == 0:
                self.optimizer_step(epoch, loss, loss_sum, bar)
                if self.step % SYNC_EVERY == 0 and self.out_of_time():  # at the loop's syncs only
                    break
        bar.close()
        self.check_finite()
        return loss_sum, time.perf_counter() - t_epoch, self.step - first_step

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients are synced across processes on the last one)."""
        with self.ddp.no_sync() if self.group.world > 1 and not last else nullcontext():
            with autocast(self.device, self.precision):
                x = self.data.augment(images, self.norm)
                labels = labels.to(self.device, non_blocking=True)
                loss = self.task.train_loss(self.forward, x, labels).float()
            self.scaler.scale(loss / self.accum).backward()
        loss = loss.detach()
        finite = torch.isfinite(loss)
        self.n_bad += (~finite).long()
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, self.step, self.first_bad)
        return loss

    def optimizer_step(self, epoch: int, loss: torch.Tensor, loss_sum: torch.Tensor, bar) -> None:
        """The update with the scheduled lr; every SYNC_EVERY steps the only host syncs of the loop."""
        tc, rc = self.cfg.train, self.cfg.run
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.scaler.step(self.optimizer)  # with a fused optimizer: skips a non-finite step without a host sync
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model, self.step)
        self.step, self.done = self.step + 1, self.done + 1
        now = time.perf_counter()
        dt, self.t_step = now - self.t_step, now
        self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        if self.step % SYNC_EVERY == 0:
            self.check_finite()
            if self.logger.interactive:
                bar.set_postfix(
                    loss=f"{loss.item():.4f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{tc.batch_size / self.step_time:.0f}",
                    run_eta=fmt_time((self.total_steps - self.step) * self.step_time),
                )
        if rc.save_every and self.step % rc.save_every == 0 and self.done < self.steps_per_epoch:
            self.save(epoch, self.done, loss_sum)

    def end_epoch(self, epoch: int, loss_sum: torch.Tensor, seconds: float, steps: int) -> dict:
        """Validate, log, write the weights and the checkpoint; returns the epoch's metrics."""
        tc, rc, group = self.cfg.train, self.cfg.run, self.group
        t_end = time.perf_counter()
        share = torch.arange(group.rank, self.n_val, group.world)  # each process validates its share
        batches = self.data.val_batches(share, tc.micro_batch)
        val = evaluate(self.task, batches, self.norm, self.precision, rc.seed, group, self.judged)
        metrics = {
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": group.sum_(loss_sum.clone()).item() / (self.steps_per_epoch * self.accum * group.world),
            **{f"val_{k}": v for k, v in val.items() if k != "n"},
            "lr": self.lr(self.step - 1),
            "img_per_s": steps * tc.batch_size / seconds,
            "epoch_time_s": seconds,
            **({"skipped_images": self.data.skipped()} if rc.skip_bad_images else {}),
        }
        metrics["best"] = self.stopper.update(metrics[tc.monitor])
        if group.main and self.task.on_epoch_end:
            metrics.update(self.task.on_epoch_end(epoch, self.logger) or {})  # e.g. a k-NN accuracy
        left = (tc.epochs - epoch - 1) * self.steps_per_epoch * (self.step_time or 0)
        self.logger.epoch(metrics, eta_s=left)
        if group.main:
            if metrics["best"]:
                save_weights(self.judged, self.task.meta, self.run_dir / "best.safetensors")
            save_weights(self.judged, self.task.meta, self.run_dir / "model.safetensors")
        self.epoch_seconds = time.perf_counter() - t_end + seconds  # training, validation and weights
        self.epoch_times.append(self.epoch_seconds)
        self.fit_to_time(epoch + 1)
        self.save(epoch, self.steps_per_epoch, loss_sum)
        self.done = 0
        return metrics

    def fit_to_time(self, done: int) -> None:
        """With fit_to_time and a time bound: fewer epochs once those left no longer fit (decided by rank 0's
        clock, so every process keeps the same schedule); the learning rate then follows the shorter one."""
        tc = self.cfg.train
        if not (tc.fit_to_time and tc.max_minutes):
            return
        left = tc.max_minutes * 60 - self.elapsed()
        fits = epochs_that_fit(tc.epochs, done, left * FIT_SLACK, self.epoch_times)
        fits = self.group.gather(fits)[0]
        if fits < tc.epochs:
            pace = statistics.median(self.epoch_times)
            self.logger.print(
                f"fit to time: {fits} epochs, not {tc.epochs} (the median epoch takes {pace:.0f} s, "
                f"{left / 60:.1f} minutes are left); the learning rate anneals over {fits}"
            )
            tc.epochs, self.fitted = fits, fits
            self.total_steps = fits * self.steps_per_epoch
            if self.group.main:
                text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
                atomic_write(self.run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))

    def check_finite(self) -> None:
        rc = self.cfg.run
        if self.group.sum_(self.n_bad.clone()).item() > rc.skip_nonfinite:
            at = int(self.group.sum_(torch.where(self.first_bad < 0, 0, self.first_bad + 1)).item()) - 1
            raise MAEError(
                f"non-finite loss at step {max(at, 0)} (more than --skip-nonfinite {rc.skip_nonfinite}); the last "
                f"good checkpoint is kept: lower --blr or check the data, then --resume {self.run_dir}"
            )

    def save(self, epoch: int, done: int, loss_sum: torch.Tensor) -> None:
        """checkpoint.pt: everything a resume needs, down to the position in the epoch and every RNG state."""
        self.check_finite()
        group, device = self.group, self.device
        rng = {
            "torch": group.gather(torch.get_rng_state()),
            "cuda": group.gather(torch.cuda.get_rng_state(device)) if device.type == "cuda" else [],
        }
        losses = group.gather(loss_sum.item())
        if group.main:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "stopper": self.stopper.state_dict(),
                "epoch": epoch,
                "epoch_step": done,
                "step": self.step,
                "loss_sum": losses,
                "seconds": self.elapsed(),
                "epoch_seconds": self.epoch_seconds,
                "epoch_times": self.epoch_times,
                "rng": rng,
                "config": self.cfg.to_dict(),
                **({"ema": self.ema.module.state_dict()} if self.ema else {}),
            }
            atomic_write(self.run_dir / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
        group.barrier()
