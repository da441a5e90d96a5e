"""Validation accuracy of a fine-tuning run's weights on the run's own validation split, with and without flip
test-time augmentation: the comparison behind the speedrun's `tta_flip` (docs/small-data.md), made on
validation images, never on held-out ones.

Usage: python scripts/val_accuracy.py RUN_DIR [--weights model.safetensors] [--device cpu]
Prints one JSON object: {"val_acc": ..., "val_acc_tta_flip": ..., "n": ...}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mae_torch.config import resolve
from mae_torch.data import build_datasets
from mae_torch.engine import Task, evaluate
from mae_torch.models import build_vit, load_weights, model_config_from
from mae_torch.runtime import Normalizer, load_state, make_loader, resolve_device, resolve_precision
from mae_torch.tasks import classification_sums, data_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--weights", default="model.safetensors", help="which weights of the run (last epoch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cfg = resolve("finetune", None, str(args.run / "config.yaml"))
    _, val, classes = build_datasets(**data_args(cfg), need_labels=True)
    state, meta = load_weights(args.run / args.weights)
    m = model_config_from(meta)
    model = build_vit(m, len(meta["classes"]))
    load_state(model, {k: v.float() for k, v in state.items()}, str(args.run / args.weights))
    device = resolve_device(args.device)
    model.to(device)
    norm, precision = Normalizer(m.mean, m.std, device), resolve_precision(cfg.run.precision, device)
    out = {}
    for key, tta in (("val_acc", False), ("val_acc_tta_flip", True)):
        task = Task(model, None, lambda model, x, y, tta=tta: classification_sums(model, x, y, tta), meta)
        result = evaluate(task, make_loader(val, 256, 0, device), norm, precision)
        out[key], out["n"] = result["acc"], result["n"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
