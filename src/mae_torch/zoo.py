"""Models by name, as timm's `create_model`: the official MAE's pretraining and fine-tuning models, and ours.

Design decisions:
- A name is a row of `MODELS`: an MAE (pretraining) or a classifier, the preset whose `model` section
  describes it, and a classifier's default class count. The numbers live in the presets alone (which
  tests/test_recipes.py checks against the paper), never repeated here.
- The official names are facebookresearch/mae's: `mae_vit_{base,large}_patch16` and `mae_vit_huge_patch14`
  (models_mae.py: 224-pixel images, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, fixed sin-cos positions, a
  decoder 512 wide with 8 blocks of 16 heads), and `vit_{base,large}_patch16`, `vit_huge_patch14`
  (models_vit.py as main_finetune.py builds it: 1000 classes, mean-pooled patch tokens through fc_norm, drop
  path 0.1 / 0.2 / 0.3). One difference: the MAEs predict per-patch normalized pixels (norm_pix_loss, the
  presets' and the released checkpoints' training target), where models_mae.py's constructor defaults to raw
  pixels; pass norm_pix_loss=False for that. Ours: `mae_vit_tiny_patch2_32` and `vit_tiny_patch2_32` (the
  cifar10-vit-tiny preset, 10 classes).
- `**overrides` are ModelConfig fields, typed and validated as a config file's, plus num_classes for a
  classifier; anything else is a one-line MAEError, never silently ignored.
- `pretrained=` takes whatever load_pretrained takes (paths, hf-hub: references). The weights must be of the
  name's architecture: image and patch size, channels, widths, depths, MLP ratio, qkv bias and head counts
  (which leave no trace in the tensors, so they are compared from the weights' description) are checked
  first, every tensor's name and shape by a strict load after. LayerNorm eps and sin-cos or learned positions
  are not architecture: they come from the weights, so the model computes what the weights were trained to.
  A classifier may start from weights without a head (an MAE or an encoder): its encoder loads, head and
  fc_norm start fresh, as fine-tuning starts.
- The model comes in training mode, as timm's; no config is attached to it (models.py): `model_config(name)`
  gives the ModelConfig (input size, mean, std) that goes with it.
"""

from __future__ import annotations

import dataclasses
from difflib import get_close_matches
from fnmatch import fnmatch
from pathlib import Path
from typing import NamedTuple

from torch import nn

from .config import ModelConfig, check, from_dict, load_preset, update
from .convert import Weights, read
from .errors import MAEError
from .models import DECODER, build_mae, build_vit, load_encoder
from .runtime import load_state


class Entry(NamedTuple):
    arch: str  # "mae" (pretraining, with decoder) or "vit" (classifier)
    preset: str  # the preset whose model section describes it
    num_classes: int = 0  # a classifier's default; overridable


MODELS = {
    "mae_vit_base_patch16": Entry("mae", "imagenet-vit-base"),
    "mae_vit_large_patch16": Entry("mae", "imagenet-vit-large"),
    "mae_vit_huge_patch14": Entry("mae", "imagenet-vit-huge"),
    "vit_base_patch16": Entry("vit", "imagenet-vit-base", 1000),
    "vit_large_patch16": Entry("vit", "imagenet-vit-large", 1000),
    "vit_huge_patch14": Entry("vit", "imagenet-vit-huge", 1000),
    "mae_vit_tiny_patch2_32": Entry("mae", "cifar10-vit-tiny"),
    "vit_tiny_patch2_32": Entry("vit", "cifar10-vit-tiny", 10),
}
ARCH = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
DECODER_ARCH = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")  # an MAE's too
FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def list_models(pattern: str = "*") -> list[str]:
    """The names create_model takes, sorted; `pattern` filters them as a shell glob ("mae_*", "*_patch16")."""
    return sorted(name for name in MODELS if fnmatch(name, pattern))


def entry(name: str) -> Entry:
    if name not in MODELS:
        close = get_close_matches(str(name), MODELS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise MAEError(f"unknown model {name!r}{hint}; choose one of {', '.join(list_models())}")
    return MODELS[name]


def model_config(name: str, **overrides) -> ModelConfig:
    """The named model's ModelConfig with `overrides` (ModelConfig fields) applied, validated."""
    e = entry(name)
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        extra = " and num_classes" if e.arch == "vit" else ""
        raise MAEError(f"unknown setting {', '.join(unknown)} for {name}; it takes ModelConfig's fields{extra}")
    cfg = from_dict(ModelConfig, load_preset(e.preset)["model"])
    update(cfg, overrides, f"the settings of {name}")
    cfg.validate()
    return cfg


def create_model(name: str, pretrained: str | Path | None = None, **overrides) -> nn.Module:
    """A MaskedAutoencoder or ViT by name (list_models()), with `overrides` of its ModelConfig fields (and
    num_classes for a classifier), holding `pretrained` weights (a path or an hf-hub: reference) if given."""
    e = entry(name)
    if "num_classes" in overrides and e.arch == "mae":
        raise MAEError(f"{name} is an MAE, without classes; num_classes is a classifier's: create {name[4:]}")
    num_classes = overrides.pop("num_classes", e.num_classes)
    check(type(num_classes) is int and num_classes >= 0, f"num_classes must be an int >= 0, got {num_classes!r}")
    cfg = model_config(name, **overrides)
    if pretrained is True:  # timm's spelling for default weights: mae-torch names have none
        raise MAEError("pretrained= takes weights: a path, or hf-hub:ORG/NAME (e.g. hf-hub:facebook/vit-mae-base)")
    if pretrained is None or pretrained is False:
        return build_mae(cfg) if e.arch == "mae" else build_vit(cfg, num_classes)
    w = read(pretrained, num_heads=cfg.num_heads, decoder_num_heads=cfg.decoder_num_heads)
    check_fits(name, e.arch, cfg, num_classes, w, pretrained)
    cfg = dataclasses.replace(cfg, norm_eps=w.model.norm_eps, pos_embed=w.model.pos_embed)  # how they compute
    model = build_mae(cfg) if e.arch == "mae" else build_vit(cfg, num_classes)
    if e.arch == "mae" or w.num_classes:
        load_state(model, w.state, str(pretrained))  # strict: every tensor's name and shape
    else:  # a classifier from an encoder: only head and fc_norm (or norm) may be missing
        load_encoder(model, {k: v for k, v in w.state.items() if not k.startswith(DECODER)})
    return model


def check_fits(name: str, arch: str, cfg: ModelConfig, num_classes: int, w: Weights, pretrained) -> None:
    """One line naming every setting in which the weights differ from the named architecture."""
    if arch == "mae" and w.arch != "mae":
        raise MAEError(f"{pretrained} has no decoder, and {name} is an MAE: create {name[4:]} (the classifier)")
    ours = {**dataclasses.asdict(cfg), "num_classes": num_classes}
    theirs = {**dataclasses.asdict(w.model), "num_classes": w.num_classes}
    fields = ARCH + (DECODER_ARCH if arch == "mae" else ())
    if arch == "vit" and w.num_classes:  # a head to keep: its classes and what it reads (pooling) must agree
        fields += ("num_classes", "global_pool")
    diff = [f"{k} {theirs[k]} (weights) vs {ours[k]}" for k in fields if theirs[k] != ours[k]]
    if diff:
        raise MAEError(f"{pretrained} does not fit {name}: {'; '.join(diff)}; pass the weights' values as settings")
