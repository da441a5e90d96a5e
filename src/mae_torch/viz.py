"""Reconstruction grids: masked input | reconstruction with the visible patches pasted in | original.

With `norm_pix_loss` the decoder predicts each patch normalized by its own mean and variance, which are
unknown for a removed patch. We de-normalize with the statistics of the image's *visible* patches (honest:
no peeking at the removed pixels); without it, reconstructions look like noise, the most common complaint
about MAE demos. Small images are upscaled with nearest-neighbour so patches stay crisp.

Legend: B batch, C channels, L patches, P = p*p*C pixels per patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from .mae import MaskedAutoencoder
from .ops import patchify, unpatchify

MIN_SIDE = 96  # upscale each image to at least this many pixels per side


def denormalize_patches(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """Undo per-patch normalization of pred (B, L, P) with the mean and variance of the visible patches."""
    patches = patchify(imgs, p)  # (B, L, P)
    visible = (1 - mask).unsqueeze(-1)  # (B, L, 1)
    n = visible.sum(dim=1, keepdim=True)  # (B, 1, 1)
    mean = (patches.mean(-1, keepdim=True) * visible).sum(1, keepdim=True) / n  # (B, 1, 1)
    var = (patches.var(-1, keepdim=True) * visible).sum(1, keepdim=True) / n
    return pred * (var + 1e-6) ** 0.5 + mean


def caption(model: MaskedAutoencoder, mask_ratio: float | None = None, prefix: str = "") -> str:
    """What a reconstruction picture shows, including how norm_pix_loss predictions were de-normalized."""
    ratio = model.mask_ratio if mask_ratio is None else mask_ratio
    text = f"{prefix}{ratio:.0%} of patches removed (grey); the reconstruction pastes the visible patches back"
    if model.norm_pix_loss:
        text += (
            ".\nnorm_pix_loss model: it predicts per-patch normalized pixels; removed patches are shown "
            "de-normalized with the mean and variance of the visible patches"
        )
    return text


@torch.no_grad()
def reconstruction_grid(
    model: MaskedAutoencoder, imgs: torch.Tensor, noise: torch.Tensor, mean, std, mask_ratio: float | None = None
) -> torch.Tensor:
    """Normalized images (B, C, H, W) and masking noise (B, L) -> a (3, H', W') grid in [0, 1], one row each."""
    was_training = model.training
    model.eval()
    out = model(imgs, mask_ratio=mask_ratio, noise=noise)
    model.train(was_training)
    p, grid = model.patch_size, model.grid_size
    pred = out.pred.float()
    if model.norm_pix_loss:
        pred = denormalize_patches(pred, imgs, out.mask, p)
    recon = unpatchify(pred, p, grid)
    mask = unpatchify(out.mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), p, grid)  # (B, C, H, W), 1 = removed
    m = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)

    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return (x * s + m).clamp(0, 1)

    original = to_pixels(imgs)
    masked = original * (1 - mask) + 0.5 * mask  # removed patches shown grey
    pasted = original * (1 - mask) + to_pixels(recon) * mask
    rows = torch.stack([masked, pasted, original], dim=1).flatten(0, 1)  # (3B, C, H, W)
    if rows.shape[1] == 1:
        rows = rows.expand(-1, 3, -1, -1)
    scale = max(1, -(-MIN_SIDE // rows.shape[-1]))
    rows = F.interpolate(rows, scale_factor=scale, mode="nearest")
    return make_grid(rows.cpu(), nrow=3, padding=2, pad_value=1.0)
