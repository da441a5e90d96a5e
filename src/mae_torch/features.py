"""`mae embed`: encoder features of a dataset, without masking, for linear probes, k-NN or plots.

The features are `ViT.encode` (CLS token or mean patch token) of any mae-torch weights, pretraining or
fine-tuned, computed under no_grad in the weights' own input normalization. Labels (and class names)
are written beside the features when the data is labeled, so `feats.npy` + `feats.labels.npy` are a
ready-made probing set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .data import build_datasets, build_eval_dataset
from .errors import MAEError
from .runtime import Normalizer, autocast, load_state, make_loader, resolve_device, resolve_precision
from .tasks import build_mae, build_vit, load_weights, model_config_from


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
    state, meta = load_weights(checkpoint)
    m = model_config_from(meta)
    model = build_mae(m) if meta["arch"] == "mae" else build_vit(m, len(meta.get("classes") or []))
    load_state(model, state, str(checkpoint))
    if split == "train":
        ds, _, classes = build_datasets(
            data, data_root=data_root or None, img_size=m.img_size, in_chans=m.in_chans, val_fraction=0.0
        )
    elif split == "eval":
        ds, classes = build_eval_dataset(data, data_root=data_root or None, img_size=m.img_size, in_chans=m.in_chans)
    else:
        raise MAEError(f"split must be train or eval, not {split}")
    dev = resolve_device(device)
    model.to(dev).eval()
    norm, precision = Normalizer(m.mean, m.std, dev), resolve_precision("auto", dev)
    feats, labels = [], []
    for images, y in make_loader(ds, batch_size, num_workers, dev):
        with autocast(dev, precision):
            feats.append(model.encode(norm(images), pool).float().cpu())
        labels.append(y)
    features = torch.cat(feats).numpy()
    out = Path(out)
    np.save(out, features)
    if classes:
        np.save(out.with_suffix(".labels.npy"), torch.cat(labels).numpy())
        out.with_suffix(".classes.json").write_text(json.dumps(classes))
    return {"n": len(features), "dim": features.shape[1], "labeled": bool(classes), "out": str(out)}
