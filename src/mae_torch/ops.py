"""The index math of MAE, as pure functions: patches, masking, position tables, the loss.

These are where MAE bugs have lived in other projects, so each is stateless, device-agnostic, seedable and
tested for its invariants (tests/test_ops.py). Conventions follow the official code
(facebookresearch/mae, models_mae.py) so weights and noise move between implementations unchanged:

- a patch is flattened in (p, p, c) order: row within the patch, column, then channel;
- masking keeps the patches with the *smallest* noise, per sample, by argsort (transformers' ViTMAE `noise`
  argument has the same meaning, so the same noise gives the same mask there);
- `mask: (B, L)`, 1 = removed (hidden from the encoder, predicted by the decoder), 0 = visible.

Legend: B batch, C channels, H/W image size, p patch size, L = (H/p)*(W/p) patches, K kept patches, D width.
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in raster order, pixels in (p, p, C) order."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int | None = None) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, h*p, w*p); the inverse of `patchify` for a grid of h x w patches."""
    w = h if w is None else w
    B, L, D = x.shape
    C = D // (p * p)
    x = x.reshape(B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
    return x.reshape(B, C, h * p, w * p)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), index (B, M) -> (B, M, D), row m of sample b being x[b, index[b, m]]: `torch.gather` with
    the index expanded over D (the official code's form), as one flat `index_select`: the same numbers, forward
    and backward together about 3x faster on the CPUs measured (docs/benchmarks-log.md)."""
    B, N, D = x.shape
    flat = (index + N * torch.arange(B, device=index.device).unsqueeze(1)).flatten()
    return x.reshape(B * N, D).index_select(0, flat).view(B, -1, D)


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (official MAE semantics).

    x: (B, L, D) patch tokens. noise: (B, L) in [0, 1), drawn on x's device when None.
    Returns kept (B, K, D), mask (B, L; 1 = removed) and ids_restore (B, L), which puts a sequence in
    shuffled order (kept first, then removed) back in patch order. K = int(L * (1 - mask_ratio)).
    """
    B, L, _ = x.shape
    K = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K]
    kept = take_rows(x, ids_keep)  # (B, K, D)
    mask = torch.ones(B, L, device=x.device)  # float32 even under autocast: its sum must be exact
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return kept, mask, ids_restore


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position table, (1 + h*w, dim) with a zero row for the CLS token first.

    As in the official code (MoCo v3's recipe): half the channels encode the row, half the column; each
    half is [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(k / (dim/4)).
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, dim/2)
        out = pos.flatten()[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    # Official order: meshgrid(w, h), so the first half of the channels follows the column index.
    gw, gh = torch.meshgrid(
        torch.arange(grid_w, dtype=torch.float64), torch.arange(grid_h, dtype=torch.float64), indexing="xy"
    )
    table = torch.cat([encode(gw), encode(gh)], dim=1)  # (h*w, dim), raster order
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


def norm_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalize each patch by its own mean and variance (the paper's `norm_pix_loss` target, Sec. 4)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the removed patches only: pred, target (B, L, P), mask (B, L; 1 = removed)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()
