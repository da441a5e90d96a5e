"""mae-torch: Masked Autoencoders (He et al., 2021) in PyTorch.

from mae_torch import MaskedAutoencoder, ViT
mae = MaskedAutoencoder(img_size=32, patch_size=2, embed_dim=192, depth=12, num_heads=3)
out = mae(images)            # out.loss, out.pred (B, L, p*p*C), out.mask (B, L; 1 = removed)

Design decisions:
- `import mae_torch` loads no torch: the torch-backed names (MaskedAutoencoder, ViT, load_pretrained,
  create_model, the ops, ...) are exported lazily through a module-level `__getattr__` (PEP 562), which
  imports their module on first use. Otherwise every process that imports the package would pay seconds for torch, timm,
  torchvision and matplotlib, `mae --help` included, since the `mae` command lives in this package.
- The configuration (config.py) and the error type (errors.py) need only yaml, so they stay eager.
- `__all__` and `__dir__` list the lazy names too, so `from mae_torch import *`, `dir(mae_torch)` and
  tab completion see the whole public API; type checkers read the imports under `TYPE_CHECKING`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import Config, ModelConfig, RunConfig, TrainConfig, resolve
from .errors import MAEError

if TYPE_CHECKING:
    from .convert import load_pretrained
    from .mae import MAEOutput, MaskedAutoencoder
    from .ops import patchify, random_masking, sincos_pos_embed, unpatchify
    from .vit import ViT
    from .zoo import create_model, list_models

__version__ = "0.1.0"

_LAZY = {  # public name -> the submodule that defines it (and imports torch)
    "load_pretrained": "convert",
    "create_model": "zoo",
    "list_models": "zoo",
    "MAEOutput": "mae",
    "MaskedAutoencoder": "mae",
    "ViT": "vit",
    "patchify": "ops",
    "unpatchify": "ops",
    "random_masking": "ops",
    "sincos_pos_embed": "ops",
}

__all__ = [
    "load_pretrained",
    "create_model",
    "list_models",
    "Config",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "resolve",
    "MAEError",
    "MAEOutput",
    "MaskedAutoencoder",
    "ViT",
    "patchify",
    "unpatchify",
    "random_masking",
    "sincos_pos_embed",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups find it directly, without coming back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
