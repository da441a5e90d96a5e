"""Frozen-encoder evaluation: features (`mae embed`), k-NN accuracy (`mae knn`), linear probing (`mae linprobe`).

Design decisions:
- Features are `ViT.encode` (CLS token or mean patch token) of any weights convert.py reads (mae-torch's,
  official, timm's, transformers'; a path or an hf-hub: reference), computed once under no_grad in the
  weights' own input normalization (the `ModelConfig` travels beside the model, in `Frozen`, and its mean and
  std are passed to `extract`); k-NN and the linear probe then work on those tensors, so
  a 90-epoch probe costs seconds after one pass of the encoder.
- k-NN is the weighted cosine vote of DINO (Caron et al. 2021): the k most similar training features vote
  with weight exp(similarity / T). It needs no training, so it also serves as a label-light monitor of
  pretraining (`--knn-every`).
- The linear probe follows the paper (Appendix A.3): BatchNorm without affine before a linear head, LARS as
  the official code has it (lars.py; or SGD with momentum), lr = blr x batch / 256 with warmup and cosine
  decay, no weight decay. By default it trains on features computed once (seconds for small data);
  `augment=True` is the paper's protocol: the frozen encoder sees a new random resized crop (0.08-1) and flip
  of every training image in every epoch, at the cost of an encoder pass per image per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .augment import Augment
from .config import ModelConfig
from .convert import read
from .data import build_datasets, build_eval_dataset
from .data.memory import DeviceBatches, in_memory
from .errors import MAEError
from .models import build_mae, build_vit
from .optim import LARS, lr_at
from .runtime import Normalizer, autocast, load_state, make_loader, resolve_device, resolve_precision
from .vit import ViT


class Frozen(NamedTuple):
    """A frozen encoder and the description it was built from (its image size, channels, mean and std)."""

    model: ViT  # a MaskedAutoencoder is a ViT: its encoder is what `encode` runs
    config: ModelConfig


def load_frozen(checkpoint: str, device: torch.device) -> Frozen:
    """Any weights (pretraining or fine-tuned, in any format convert.py reads) as a frozen model in eval mode on
    `device`: a frozen encoder needs no class names, so timm's and transformers' serve as well as ours."""
    w = read(checkpoint)
    model = build_mae(w.model) if w.arch == "mae" else build_vit(w.model, w.num_classes)
    load_state(model, w.state, str(checkpoint))
    return Frozen(model.to(device).eval().requires_grad_(False), w.model)


@torch.no_grad()
def extract(
    model: ViT,
    ds: Dataset,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pool: str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of a dataset of uint8 images, normalized with the model's own
    `mean` and `std` (its ModelConfig's), on `device`."""
    norm = Normalizer(mean, std, device)
    precision = resolve_precision("auto", device)
    feats, labels = [], []
    for images, y in make_loader(ds, batch_size, num_workers, device):
        with autocast(device, precision):
            feats.append(model.encode(norm(images), pool).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def frozen_splits(checkpoint: str, data: str, data_root: str, val_fraction: float, seed: int, device: str):
    """The frozen model (a `Frozen`), the labeled training and validation splits (the carve training uses),
    class names and the device."""
    dev = resolve_device(device)
    frozen = load_frozen(checkpoint, dev)
    m = frozen.config
    train, val, classes = build_datasets(
        data,
        data_root=data_root or None,
        img_size=m.img_size,
        in_chans=m.in_chans,
        val_fraction=val_fraction,
        seed=seed,
        need_labels=True,
    )
    return frozen, train, val, classes, dev


def split_features(
    checkpoint: str, data: str, pool, data_root: str, val_fraction: float, seed: int, device: str, num_workers: int
):
    """Frozen features of the labeled training and validation splits, class names, and the device:
    ((train_x, train_y), (val_x, val_y), classes, device)."""
    (model, m), train, val, classes, dev = frozen_splits(checkpoint, data, data_root, val_fraction, seed, device)
    return (
        extract(model, train, dev, m.mean, m.std, pool, num_workers=num_workers),
        extract(model, val, dev, m.mean, m.std, pool, num_workers=num_workers),
        classes,
        dev,
    )


def augmented_features(frozen: Frozen, train: Dataset, dev: torch.device, pool, num_workers: int):
    """(features(idx) -> (x, y) of a fresh crop + flip of those training images, number of images), for the
    paper's probe protocol; the images are held as uint8 on the device, like training's."""
    model, m = frozen
    images = in_memory(train, dev, num_workers)
    if images is None:
        raise MAEError("linprobe --augment needs the training images to fit in memory; drop --augment")
    batches = DeviceBatches(images, dev)
    aug, norm = Augment((0.08, 1.0), True), Normalizer(m.mean, m.std, dev)
    precision = resolve_precision("auto", dev)

    @torch.no_grad()
    def features(idx: torch.Tensor):
        with autocast(dev, precision):
            return model.encode(aug(batches.images[idx], norm), pool).float(), batches.labels[idx]

    return features, len(batches)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted cosine k-NN top-1 accuracy (DINO's vote); features of any device, labels >= 0."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for i in range(0, len(test_x), chunk):
        sim, idx = (test_x[i : i + chunk] @ train_x.T).topk(min(k, len(train_x)), dim=1)  # (n, k)
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i : i + chunk]).sum())
    return correct / len(test_x)


def knn(
    checkpoint: str,
    data: str,
    k: int = 20,
    temperature: float = 0.07,
    pool: str | None = None,
    data_root: str = "",
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str = "auto",
    num_workers: int = 2,
) -> dict:
    """k-NN accuracy of the frozen encoder: training split as memory, validation split as queries."""
    (tx, ty), (vx, vy), _, _ = split_features(
        checkpoint, data, pool, data_root, val_fraction, seed, device, num_workers
    )
    return {"knn_top1": knn_accuracy(tx, ty, vx, vy, k, temperature), "k": k, "n": len(vx)}


def linprobe(
    checkpoint: str,
    data: str,
    epochs: int = 90,
    batch_size: int = 4096,
    blr: float = 0.1,
    optimizer: str = "lars",
    pool: str | None = "cls",
    data_root: str = "",
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str = "auto",
    num_workers: int = 2,
    augment: bool = False,
    log=print,
) -> dict:
    """Train BatchNorm(affine=False) + linear on frozen features; returns the validation top-1 per epoch."""
    if optimizer not in ("lars", "sgd"):
        raise MAEError(f"optimizer must be lars or sgd, not {optimizer}")
    frozen, train, val, classes, dev = frozen_splits(checkpoint, data, data_root, val_fraction, seed, device)
    model, m = frozen
    vx, vy = extract(model, val, dev, m.mean, m.std, pool, num_workers=num_workers)
    if augment:
        features, n = augmented_features(frozen, train, dev, pool, num_workers)
    else:
        tx, ty = extract(model, train, dev, m.mean, m.std, pool, num_workers=num_workers)
        features, n = (lambda idx: (tx[idx], ty[idx])), len(tx)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(vx.shape[1], affine=False, eps=1e-6), nn.Linear(vx.shape[1], len(classes)))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    head.to(dev)
    batch = min(batch_size, n)
    lr = blr * batch / 256
    kind = LARS if optimizer == "lars" else torch.optim.SGD
    opt = kind(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps = n // batch
    total, warmup = epochs * steps, min(10, epochs // 9) * steps  # the paper: 10 warmup epochs of 90
    history = []
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(n, generator=g)[: steps * batch].to(dev)
        for s in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + s, total, warmup, lr)
            x, y = features(order[s * batch : (s + 1) * batch])
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            acc = float((head(vx).argmax(1) == vy).float().mean())
        history.append(acc)
        log(f"linprobe epoch {epoch + 1}/{epochs}: train loss {loss.item():.4f} | val top-1 {acc:.4f}")
    return {"top1": history[-1], "best_top1": max(history), "epochs": epochs, "n": len(vx)}


@torch.no_grad()
def embed(
    checkpoint: str,
    data: str,
    out: str,
    pool: str | None = None,
    split: str = "train",
    data_root: str = "",
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 2,
) -> dict:
    """Write the features of `data` to `out` (.npy, (N, D) float32) and its labels beside; returns a summary.

    split "train": CIFAR's training split, or every image of a folder (its train/ if it has one);
    split "eval": CIFAR's test split, or the folder's test/ (else val/, else itself), as `mae evaluate` reads.
    """
    dev = resolve_device(device)
    model, m = load_frozen(checkpoint, dev)
    if split == "train":
        ds, _, classes = build_datasets(
            data, data_root=data_root or None, img_size=m.img_size, in_chans=m.in_chans, val_fraction=0.0
        )
    elif split == "eval":
        ds, classes = build_eval_dataset(
            data, data_root=data_root or None, img_size=m.img_size, in_chans=m.in_chans, crop_pct=m.crop_pct
        )
    else:
        raise MAEError(f"split must be train or eval, not {split}")
    feats, labels = extract(model, ds, dev, m.mean, m.std, pool, batch_size, num_workers)
    out = Path(out)
    np.save(out, feats.cpu().numpy())
    if classes:
        np.save(out.with_suffix(".labels.npy"), labels.cpu().numpy())
        out.with_suffix(".classes.json").write_text(json.dumps(classes))
    return {"n": len(feats), "dim": feats.shape[1], "labeled": bool(classes), "out": str(out)}
