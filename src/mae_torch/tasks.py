"""The jobs - pretrain, finetune, evaluate, reconstruct - as the engine's parts.

Design decisions:
- Pretraining and fine-tuning are the same engine (`engine.fit`) with a different `Task`: MAE's loss and
  a reconstruction grid of fixed validation images with a fixed mask, or cross-entropy and accuracy.
- Models and weights files come from models.py; fine-tuning (its pretrained encoder) and reconstruction read
  weights in any format through convert.py (hf-hub: references too), and `--knn-every` scores pretraining with
  features.py. None of those imports this module.
- Evaluation matches a folder's class names to the checkpoint's by name, so a test folder with a subset
  of the classes (or another order) evaluates correctly; an unknown class is an error.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn

from .config import Config, TrainConfig
from .convert import read
from .data import ImageFiles, build_datasets, build_eval_dataset, label_subset, list_images
from .engine import Task, evaluate, fit
from .errors import MAEError
from .features import extract, knn_accuracy
from .models import ENCODER_FIELDS, build_mae, build_vit, load_encoder_for, load_weights, model_config_from
from .plots import save_reconstructions
from .runtime import Normalizer, load_state, make_loader, resolve_device, resolve_precision
from .viz import caption, reconstruction_grid


def start_run(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Create the run directory; an existing run is continued only on resume, replaced only on overwrite."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "checkpoint.pt").exists():
            raise MAEError(f"cannot resume {run_dir}: no checkpoint.pt there")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise MAEError(
                f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it, "
                "--overwrite to replace it, or another --out"
            )
        shutil.rmtree(run_dir, ignore_errors=True)  # every torchrun process may do it; each one's is enough
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def pretrain(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """MAE pretraining into run_dir (see README, "What a run writes"); returns the last epoch's metrics."""
    run_dir = start_run(run_dir, resume, overwrite)
    train_ds, val_ds, classes = build_datasets(**data_args(cfg))
    torch.manual_seed(cfg.run.seed)  # --seed decides the initial weights
    model = build_mae(cfg.model)
    device = resolve_device(cfg.run.device)
    n = min(cfg.run.recon_images, len(val_ds))
    picks = torch.linspace(0, len(val_ds) - 1, n).round().long().tolist()  # spread over the classes
    fixed = torch.stack([val_ds[i][0] for i in picks]) if n else None  # the same images every epoch...
    noise = torch.rand(n, model.patch_embed.num_patches, generator=torch.Generator().manual_seed(cfg.run.seed))
    norm = Normalizer(cfg.model.mean, cfg.model.std, device)  # ...with the same mask, so epochs compare

    knn_every = cfg.run.knn_every if classes else 0  # k-NN needs labels; pretraining itself never sees them

    def show(epoch: int, logger) -> dict:
        if n:
            grid = reconstruction_grid(model, norm(fixed), noise.to(device), cfg.model.mean, cfg.model.std)
            logger.reconstructions(
                grid, epoch + 1, caption(model, prefix=f"epoch {epoch + 1}, fixed images and mask: ")
            )
        if knn_every and (epoch + 1) % knn_every == 0:
            was_training = model.training
            model.eval()
            memory = extract(model, train_ds, device, cfg.model.mean, cfg.model.std)
            queries = extract(model, val_ds, device, cfg.model.mean, cfg.model.std)
            model.train(was_training)
            return {"knn_acc": knn_accuracy(*memory, *queries)}
        return None

    def eval_sums(model, x, y):
        return {"loss": model(x, pred_visible=False).loss * len(x)}

    meta = {"arch": "mae", "model": asdict(cfg.model), "classes": classes}
    task = Task(model, lambda model, x, y: model(x, pred_visible=False).loss, eval_sums, meta, show)
    return fit(task, train_ds, val_ds, cfg, run_dir, resume)


def finetune(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a classifier into run_dir, from scratch or from cfg.run.pretrained; returns the last metrics."""
    run_dir = start_run(run_dir, resume, overwrite)
    if cfg.run.pretrained and not resume:
        # ours, official, transformers or timm weights; heads the file does not state are this run's
        pretrained = read(
            cfg.run.pretrained, num_heads=cfg.model.num_heads, decoder_num_heads=cfg.model.decoder_num_heads
        )
        pre = pretrained.model
        changed = [f"{k}={getattr(cfg.model, k)}" for k in ENCODER_FIELDS if getattr(cfg.model, k) != getattr(pre, k)]
        if changed:
            print(f"note: the encoder comes from {cfg.run.pretrained}; its settings replace {', '.join(changed)}")
        if (pre.img_size, pre.patch_size) != (cfg.model.img_size, cfg.model.patch_size):
            print(
                f"note: encoder pretrained on {pre.img_size}px images with {pre.patch_size}px patches, fine-tuned "
                f"on {cfg.model.img_size}px with {cfg.model.patch_size}px: positions (and patch kernel) resized"
            )
        for k in ENCODER_FIELDS:
            setattr(cfg.model, k, getattr(pre, k))
    train_ds, val_ds, classes = build_datasets(**data_args(cfg), need_labels=True)
    train_ds = label_subset(train_ds, cfg.run.label_fraction, cfg.run.labels_per_class, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model = build_vit(cfg.model, len(classes))
    if cfg.run.pretrained and not resume:
        load_encoder_for(model, pretrained.state)
    tc = cfg.train
    mix = finetune_mixing(tc, len(classes))

    def train_loss(model, x, y):
        return classification_loss(model, x, y, mix, tc.label_smoothing)

    def sums(model, x, y):
        return classification_sums(model, x, y, tc.tta_flip)

    meta = {"arch": "vit", "model": asdict(cfg.model), "classes": classes}
    return fit(Task(model, train_loss, sums, meta), train_ds, val_ds, cfg, run_dir, resume)


def finetune_mixing(tc: TrainConfig, num_classes: int) -> Mixup | None:
    """timm's mixup/cutmix of a fine-tuning batch (soft targets that carry the label smoothing), or None."""
    if not (tc.mixup or tc.cutmix):
        return None
    if tc.micro_batch % 2:
        raise MAEError(f"mixup and cutmix pair images: use an even --device-batch-size, not {tc.micro_batch}")
    return Mixup(
        mixup_alpha=tc.mixup, cutmix_alpha=tc.cutmix, label_smoothing=tc.label_smoothing, num_classes=num_classes
    )


def classification_loss(model, x: torch.Tensor, y: torch.Tensor, mix: Mixup | None, smoothing: float) -> torch.Tensor:
    """Fine-tuning's training loss: cross-entropy with label smoothing, or against mixup's soft targets."""
    if mix:
        x, soft = mix(x, y)
        return torch.sum(-soft * F.log_softmax(model(x).float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(model(x), y, label_smoothing=smoothing)


def classification_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tta_flip: bool = False) -> dict:
    """Summed loss and correct predictions; tta_flip averages the logits of each image and its mirror."""
    logits = model(x).float()
    if tta_flip:
        logits = (logits + model(x.flip(-1)).float()) / 2
    return {"loss": F.cross_entropy(logits, y, reduction="sum"), "acc": (logits.argmax(-1) == y).sum()}


def data_args(cfg: Config) -> dict:
    r, m = cfg.run, cfg.model
    if not r.data:  # the ImageNet presets name no data set: CIFAR would silently train a 224-pixel model on it
        raise MAEError("no data given: this preset has no default data set; pass --data PATH (a folder of images)")
    return dict(
        data=r.data,
        data_root=r.data_root or None,
        img_size=m.img_size,
        in_chans=m.in_chans,
        val_fraction=r.val_fraction,
        test_fraction=r.test_fraction,
        seed=r.seed,
        skip_bad=r.skip_bad_images,
    )


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    data_root: str = "",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 256,
    num_workers: int = 2,
    tta_flip: bool = False,
    test_fraction: float = 0.0,
) -> dict:
    """Top-1 accuracy and mean loss of a fine-tuned classifier on a labeled dataset: {top1, loss, n};
    test_fraction > 0: on the training images that runs with that --test-fraction held out."""
    state, meta = load_weights(checkpoint)
    if meta.get("arch") != "vit":
        raise MAEError(f"{checkpoint} holds MAE pretraining weights, not a classifier; fine-tune it first")
    if not meta.get("classes"):
        raise MAEError(
            f"{checkpoint} names no classes (converted from another format?): evaluation matches "
            "classes by name, so fine-tune it with mae finetune first"
        )
    m = model_config_from(meta)
    model = build_vit(m, len(meta["classes"]))
    load_state(model, state, str(checkpoint))
    ds, classes = build_eval_dataset(
        data,
        data_root=data_root or None,
        img_size=m.img_size,
        in_chans=m.in_chans,
        crop_pct=m.crop_pct,
        test_fraction=test_fraction,
    )
    unknown = sorted(set(classes) - set(meta["classes"]))
    if unknown:
        raise MAEError(f"classes {unknown} of {data} are not among the checkpoint's {meta['classes']}")
    to_ckpt = torch.tensor([meta["classes"].index(c) for c in classes])  # dataset label -> model label
    dev = resolve_device(device)
    model.to(dev)
    norm = Normalizer(m.mean, m.std, dev)

    def sums(model, x, y):
        return classification_sums(model, x, to_ckpt.to(y.device)[y], tta_flip)

    loader = make_loader(ds, batch_size, num_workers, dev)
    result = evaluate(Task(model, None, sums, meta), loader, norm, resolve_precision(precision, dev))
    return {"top1": result["acc"], "loss": result["loss"], "n": result["n"]}


def reconstruct(
    checkpoint: str,
    images: list[str],
    out: str,
    mask_ratio: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    max_images: int = 16,
) -> Path:
    """A labelled grid (masked | reconstruction | original) of the user's own images; returns its path. Any MAE
    weights with their decoder: a pretrain run's, official, transformers' ViTMAEForPreTraining, hf-hub: ones."""
    w = read(checkpoint)
    if w.arch != "mae" or "decoder_pred.weight" not in w.state:
        raise MAEError(f"{checkpoint} has no decoder: reconstruction needs the full MAE weights of a pretrain run")
    if mask_ratio is not None and not 0 < mask_ratio < 1:
        raise MAEError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
    m = w.model
    model = build_mae(m)
    load_state(model, w.state, str(checkpoint))
    dev = resolve_device(device)
    model.to(dev)
    paths = list_images(images)[:max_images]
    ds = ImageFiles(paths, None, m.img_size, m.in_chans)
    imgs = Normalizer(m.mean, m.std, dev)(torch.stack([ds[i][0] for i in range(len(ds))]))
    noise = torch.rand(len(ds), model.patch_embed.num_patches, generator=torch.Generator().manual_seed(seed))
    grid = reconstruction_grid(model, imgs, noise.to(dev), m.mean, m.std, mask_ratio)
    save_reconstructions(grid, out, caption(model, mask_ratio, prefix=f"{Path(checkpoint).name}, seed {seed}: "))
    return Path(out)
