"""mae-torch: Masked Autoencoders (He et al., 2021) in PyTorch.

from mae_torch import MaskedAutoencoder, ViT
mae = MaskedAutoencoder(img_size=32, patch_size=2, embed_dim=192, depth=12, num_heads=3)
out = mae(images)            # out.loss, out.pred (B, L, p*p*C), out.mask (B, L; 1 = removed)
"""

from .config import Config, ModelConfig, RunConfig, TrainConfig, resolve
from .convert import load_pretrained
from .errors import MAEError
from .mae import MAEOutput, MaskedAutoencoder
from .ops import patchify, random_masking, sincos_pos_embed, unpatchify
from .vit import ViT

__version__ = "0.1.0"
__all__ = [
    "load_pretrained",
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
