"""Weights fitted to another image or patch size: position tables and the patch kernel, resized.

Design decisions:
- A sin-cos table is recognized by value and regenerated for the new grid (exact); a learned one is resized
  bicubically by timm's `resample_abs_pos_embed`, the CLS row kept, as timm resizes its own ViTs.
- A new patch size resamples the patch kernel with timm's `resample_patch_embed` (FlexiViT's pseudo-inverse
  resize); it applies to an encoder only, since the decoder predicts the old patches' pixels.
"""

from __future__ import annotations

from math import isqrt

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from .errors import MAEError
from .ops import sincos_pos_embed


def is_sincos(pos_embed: torch.Tensor) -> bool:
    """Whether a (1, 1 + g*g, D) table is the fixed 2-D sin-cos one (up to fp16 storage rounding)."""
    D, grid = pos_embed.shape[-1], isqrt(pos_embed.shape[1] - 1)
    return D % 4 == 0 and torch.allclose(pos_embed[0].float(), sincos_pos_embed(D, grid), atol=1e-3)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, kind: str | None = None) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + new_grid**2, D); kind "sincos" (regenerated), "learned" (bicubic, the CLS
    row kept, as timm resizes its ViTs) or None: recognized from the values."""
    D, grid = pos_embed.shape[-1], isqrt(pos_embed.shape[1] - 1)
    kind = kind or ("sincos" if is_sincos(pos_embed) else "learned")
    if kind == "sincos":
        return sincos_pos_embed(D, new_grid).unsqueeze(0).to(pos_embed)
    if kind != "learned":
        raise ValueError(f"kind must be 'sincos', 'learned' or None, got {kind!r}")
    return resample_abs_pos_embed(pos_embed, [new_grid, new_grid], [grid, grid], num_prefix_tokens=1)


def adapt_state(state: dict, img_size: int, patch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Weights fitted to another image size (and patch size): position tables resized, and for an encoder the
    patch kernel resampled (FlexiViT's pseudo-inverse resize, timm's `resample_patch_embed`)."""
    state, w = dict(state), state["patch_embed.proj.weight"]
    p = patch_size or w.shape[-1]
    if p != w.shape[-1]:
        if "decoder_pred.weight" in state:
            raise MAEError("a new patch size applies to an encoder only: the decoder predicts the old patches")
        state["patch_embed.proj.weight"] = resample_patch_embed(w, [p, p])
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in state:
            state[key] = resize_pos_embed(state[key], img_size // p)
    return state
