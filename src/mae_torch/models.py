"""Models from their description, and mae-torch weights in and out: the bottom that tasks, convert, features
and bench build on.

Design decisions:
- A model is built from a `ModelConfig` alone (`build_mae`, `build_vit`); the config is not kept on the model.
  Whoever needs its input size, mean or std holds the `ModelConfig` beside it (a weights file's metadata,
  `model_config_from`) and passes it on.
- Shared weights are `.safetensors` files whose metadata (and a JSON beside them) describe the model:
  `arch` ("mae" or "vit"), the `model` config and, for classifiers, the `classes` by name. Reading them runs
  no pickle. They are written by `save_weights` (runtime.py's atomic write, which the engine's checkpoints use
  too) and read by `load_weights`.
- Transferring an encoder asserts exactly which keys are missing (head, fc_norm) and unexpected (the
  decoder, norm): anything else means another architecture, and is an error that lists the keys. Weights of
  another image or patch size are resized to the classifier's (resize.py) first.
- Weights may be `hf-hub:ORG/NAME[@REVISION]` references: `weights_file` resolves them (hub.py) to the
  downloaded repository's folder first, so every command that reads mae-torch weights takes them.
- This module imports only config, errors, hub, vit, mae, resize and runtime: never tasks, convert, features or
  engine, which import it (tests/test_structure.py keeps the module graph free of cycles).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .config import ModelConfig, from_dict
from .errors import MAEError
from .hub import resolve_ref
from .mae import MaskedAutoencoder
from .resize import adapt_state
from .runtime import save_weights
from .vit import ViT

__all__ = [
    "DECODER",
    "ENCODER_FIELDS",
    "build_mae",
    "build_vit",
    "weights_file",
    "load_weights",
    "save_weights",
    "load_encoder",
    "load_encoder_for",
    "model_config_from",
]

DECODER = ("decoder_", "mask_token")  # an MAE's pretraining-only tensors
ENCODER_FIELDS = (  # img_size and patch_size stay the fine-tuning run's: positions are resized to them
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "pos_embed",
    "mean",
    "std",
    "norm_eps",
    "qkv_bias",
)  # what a fine-tuned model inherits from its pretrained encoder


def build_mae(m: ModelConfig) -> MaskedAutoencoder:
    return MaskedAutoencoder(
        m.img_size,
        m.patch_size,
        m.in_chans,
        m.embed_dim,
        m.depth,
        m.num_heads,
        m.mlp_ratio,
        m.pos_embed,
        m.decoder_embed_dim,
        m.decoder_depth,
        m.decoder_num_heads,
        m.norm_pix_loss,
        m.mask_ratio,
        m.norm_eps,
        m.qkv_bias,
    )


def build_vit(m: ModelConfig, num_classes: int) -> ViT:
    return ViT(
        m.img_size,
        m.patch_size,
        m.in_chans,
        m.embed_dim,
        m.depth,
        m.num_heads,
        m.mlp_ratio,
        m.pos_embed,
        num_classes,
        m.global_pool,
        m.drop_path,
        m.norm_eps,
        m.qkv_bias,
    )


# ---------------------------------------------------------------- weights


def weights_file(path: str | Path) -> Path:
    """A run directory (its best, else its last weights), a .safetensors file, or an hf-hub: reference to a
    repository mae-torch wrote."""
    path = resolve_ref(path)
    if path.is_dir():
        for name in ("best.safetensors", "model.safetensors"):
            if (path / name).exists():
                return path / name
        raise MAEError(f"no weights in {path}: expected model.safetensors (is it a mae-torch run directory?)")
    if not path.exists():
        raise MAEError(f"weights not found: {path}; pass a run directory or a .safetensors file")
    if path.suffix != ".safetensors":
        raise MAEError(f"{path} is not a .safetensors file; pass a run directory or its model.safetensors")
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) of a run directory or .safetensors file written by mae-torch; no pickle involved."""
    file = weights_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("mae_torch", "null"))
        state = load_file(str(file))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise MAEError(f"cannot read weights {file}: {e}") from None
    if meta is None and file.with_suffix(".json").exists():
        meta = json.loads(file.with_suffix(".json").read_text())
    if not isinstance(meta, dict) or "model" not in meta:
        raise MAEError(f"{file} carries no mae-torch model description (model.json); convert it first")
    return state, meta


def model_config_from(meta: dict) -> ModelConfig:
    return from_dict(ModelConfig, meta["model"])


def load_encoder(vit: ViT, state: dict[str, torch.Tensor]) -> None:
    """Load a pretrained encoder into a classifier: only the head, fc_norm (and norm) may differ."""
    own = set(vit.state_dict())
    state = {k: v for k, v in state.items() if k in own}  # drops the decoder, mask token, unused norm
    missing = sorted(own - set(state))
    allowed = {k for k in own if k.startswith(("head.", "fc_norm.", "norm."))}
    if set(missing) - allowed:
        raise MAEError(f"pretrained weights do not fit this encoder: missing {sorted(set(missing) - allowed)}")
    try:
        vit.load_state_dict(state, strict=False)
    except RuntimeError as e:
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise MAEError(f"pretrained weights do not fit this encoder: {'; '.join(shapes) or e}") from None


def load_encoder_for(vit: ViT, state: dict) -> None:
    """Load a pretrained encoder (any image and patch size) into a classifier built for its own size, e.g.
    official ImageNet 224-pixel weights into a ViT for 32-pixel images; only head and fc_norm may be missing."""
    encoder = {k: v for k, v in state.items() if not k.startswith(DECODER)}  # an MAE's decoder stays behind
    load_encoder(vit, adapt_state(encoder, vit.grid_size * vit.patch_size, vit.patch_size))
