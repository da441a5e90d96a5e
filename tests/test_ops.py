"""Invariants of mae_torch.ops: patch order, masking by argsort, the sin-cos table, the loss.

The references here are written independently of the code under test: a loop over pixels for the patch order,
a transcription of the official numpy position table (facebookresearch/mae, util/pos_embed.py), and losses
computed by hand on explicit numbers.
"""

import math

import numpy as np
import pytest
import torch

from mae_torch.ops import (
    masked_mse,
    norm_patches,
    patchify,
    random_masking,
    sincos_pos_embed,
    take_rows,
    unpatchify,
)

# ---------------------------------------------------------------- patchify / unpatchify


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("C", [1, 3])
def test_patchify_round_trip(p, C):
    torch.manual_seed(0)
    imgs = torch.randn(2, C, 16, 16)
    x = patchify(imgs, p)
    h = 16 // p
    assert x.shape == (2, h * h, p * p * C)
    assert torch.equal(unpatchify(x, p, h), imgs)


@pytest.mark.parametrize("C", [1, 3])
def test_patchify_round_trip_non_square(C):
    torch.manual_seed(0)
    imgs = torch.randn(2, C, 8, 12)  # a 2 x 3 grid of 4x4 patches
    x = patchify(imgs, 4)
    assert x.shape == (2, 6, 16 * C)
    assert torch.equal(unpatchify(x, 4, 2, 3), imgs)
    # h and w are not interchangeable: the transposed grid is another image
    assert unpatchify(x, 4, 3, 2).shape == (2, C, 12, 8)


def _coded_image(B, C, H, W):
    """Pixel value encodes (b, c, y, x), so any misplaced pixel is visible."""
    b, c, y, x = torch.meshgrid(torch.arange(B), torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    return (b * 1_000_000 + c * 10_000 + y * 100 + x).double()


@pytest.mark.parametrize("C,H,W,p", [(3, 8, 8, 4), (1, 6, 6, 2), (3, 4, 8, 2), (2, 6, 4, 2)])
def test_patchify_pixel_order(C, H, W, p):
    imgs = _coded_image(2, C, H, W)
    x = patchify(imgs, p)
    h, w = H // p, W // p
    for b in range(2):
        for i in range(h):  # raster order over the grid: row-major
            for j in range(w):
                k = i * w + j
                # (p, p, c) order: row within the patch, column, then channel
                expected = [
                    imgs[b, c, i * p + u, j * p + v].item() for u in range(p) for v in range(p) for c in range(C)
                ]
                assert x[b, k].tolist() == expected, (b, i, j)


# ---------------------------------------------------------------- random_masking


def _tokens(B, L, D=3):
    """x[b, l, :] = l (+ a per-sample offset), so a token's value names its patch index."""
    return (torch.arange(L).view(1, L, 1) + 1000 * torch.arange(B).view(B, 1, 1)).expand(B, L, D).double()


def test_take_rows_is_gather_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, requires_grad=True)
    index = torch.tensor([[6, 0, 2, 2], [1, 1, 1, 1], [5, 4, 3, 0]])  # repeats too: their gradients add up
    want = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, 5))
    got = take_rows(x, index)
    assert torch.equal(got, want)
    g = torch.randn(3, 4, 5)
    (want_grad,) = torch.autograd.grad(want, x, g)
    (got_grad,) = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("L,ratio", [(64, 0.75), (16, 0.5), (10, 0.75), (49, 0.6), (7, 0.9)])
def test_random_masking_counts_and_restore(L, ratio):
    torch.manual_seed(0)
    B, D = 4, 3
    x = torch.randn(B, L, D)
    noise = torch.rand(B, L)
    kept, mask, ids_restore = random_masking(x, ratio, noise)
    K = int(L * (1 - ratio))
    assert kept.shape == (B, K, D)
    assert mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - K)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}

    # kept: the K smallest noises, in increasing noise order (official argsort semantics)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep, ids_removed = ids_shuffle[:, :K], ids_shuffle[:, K:]
    assert torch.equal(kept, torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D)))
    largest_kept = torch.gather(noise, 1, ids_keep).max(1).values if K else torch.full((B,), -1.0)
    smallest_removed = torch.gather(noise, 1, ids_removed).min(1).values
    assert (largest_kept < smallest_removed).all()

    # mask is 1 exactly at the removed positions
    expected_mask = torch.ones(B, L)
    expected_mask.scatter_(1, ids_keep, 0.0)
    assert torch.equal(mask, expected_mask)

    # [kept, removed in shuffle order] gathered with ids_restore is x again
    removed = torch.gather(x, 1, ids_removed.unsqueeze(-1).expand(-1, -1, D))
    full = torch.cat([kept, removed], dim=1)
    assert torch.equal(torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D)), x)


def test_random_masking_kept_tokens_are_smallest_noise():
    B, L = 2, 8
    x = _tokens(B, L)
    noise = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4],
            [0.05, 0.95, 0.15, 0.85, 0.25, 0.75, 0.35, 0.65],
        ]
    )
    kept, mask, _ = random_masking(x, 0.75, noise)  # K = 2
    assert kept[0, :, 0].tolist() == [1, 3]  # noise 0.1, 0.2
    assert kept[1, :, 0].tolist() == [1000 + 0, 1000 + 2]  # noise 0.05, 0.15
    assert mask.tolist() == [[1, 0, 1, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1, 1, 1]]


def test_random_masking_same_noise_same_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 4)
    noise = torch.rand(3, 16)
    a = random_masking(x, 0.75, noise)
    b = random_masking(x, 0.75, noise.clone())
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    c = random_masking(x, 0.75, torch.rand(3, 16))
    assert not torch.equal(a[1], c[1])


def test_random_masking_rows_differ():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.randn(8, 64, 2), 0.75)
    rows = {tuple(r) for r in mask.tolist()}
    assert len(rows) == 8  # per-sample masks, not one mask for the batch


def test_random_masking_without_noise_is_valid_and_seeded():
    torch.manual_seed(1)
    x = torch.randn(4, 20, 2)
    kept, mask, ids_restore = random_masking(x, 0.6)
    K = int(20 * 0.4)
    assert kept.shape == (4, K, 2)
    assert torch.equal(mask.sum(1), torch.full((4,), 20.0 - K))
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(20).expand(4, 20))
    # visible tokens are exactly the kept ones
    for b in range(4):
        visible = (mask[b] == 0).nonzero().flatten()
        assert sorted(kept[b, :, 0].tolist()) == sorted(x[b, visible, 0].tolist())
    torch.manual_seed(1)
    x2 = torch.randn(4, 20, 2)
    assert torch.equal(random_masking(x2, 0.6)[1], mask)  # the global seed decides the mask


def test_random_masking_draws_noise_on_the_input_device():
    x = torch.empty(2, 10, 3, device="meta")  # any device but the default one
    kept, mask, ids_restore = random_masking(x, 0.75)
    assert kept.device == mask.device == ids_restore.device == x.device
    assert kept.shape == (2, 2, 3) and mask.shape == (2, 10)


def test_random_masking_mask_dtype_is_float32_under_autocast():
    x = torch.randn(2, 16, 4, dtype=torch.bfloat16)
    _, mask, _ = random_masking(x, 0.75)
    assert mask.dtype == torch.float32


# ---------------------------------------------------------------- sin-cos position table


def _official_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _official_2d(embed_dim, grid_h, grid_w, cls_token):
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, generalised to an h x w grid."""
    gh = np.arange(grid_h, dtype=np.float32)
    gw = np.arange(grid_w, dtype=np.float32)
    grid = np.meshgrid(gw, gh)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    emb_h = _official_1d(embed_dim // 2, grid[0])
    emb_w = _official_1d(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("dim,grid", [(4, 2), (32, 4), (64, 7), (192, 16), (768, 14)])
def test_sincos_matches_official(dim, grid):
    table = sincos_pos_embed(dim, grid)
    assert table.shape == (1 + grid * grid, dim)
    assert table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(dim))
    ref = torch.from_numpy(_official_2d(dim, grid, grid, cls_token=True)).float()
    torch.testing.assert_close(table, ref, atol=1e-6, rtol=0)
    no_cls = sincos_pos_embed(dim, grid, cls_token=False)
    torch.testing.assert_close(no_cls, ref[1:], atol=1e-6, rtol=0)


def test_sincos_non_square_grid_is_raster_order():
    dim, gh, gw = 16, 3, 5
    table = sincos_pos_embed(dim, gh, gw)
    assert table.shape == (1 + gh * gw, dim)
    ref = torch.from_numpy(_official_2d(dim, gh, gw, cls_token=True)).float()
    torch.testing.assert_close(table, ref, atol=1e-6, rtol=0)
    patches = table[1:].view(gh, gw, dim)
    # first half of the channels follows the column, the second half the row (official order)
    assert torch.allclose(patches[:, :, : dim // 2], patches[:1, :, : dim // 2].expand(gh, -1, -1))
    assert torch.allclose(patches[:, :, dim // 2 :], patches[:, :1, dim // 2 :].expand(-1, gw, -1))
    assert not torch.allclose(patches[0, 0], patches[0, 1])
    assert not torch.allclose(patches[0, 0], patches[1, 0])


@pytest.mark.parametrize("dim", [2, 6, 30, 766])
def test_sincos_rejects_width_not_divisible_by_4(dim):
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(dim, 4)


# ---------------------------------------------------------------- loss

PRED = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])  # B=1, L=4, P=2
TARGET = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [2.0, 6.0], [3.0, 5.0]]])
MASK = torch.tensor([[1.0, 0.0, 1.0, 1.0]])


def test_masked_mse_by_hand():
    # per-patch mean squared errors of removed patches 0, 2, 3: (1+0)/2, (9+0)/2, (16+9)/2; patch 1 is visible
    expected = (0.5 + 4.5 + 12.5) / 3
    assert masked_mse(PRED, TARGET, MASK).item() == pytest.approx(expected, rel=1e-6)
    # the visible patch does not count: changing its target leaves the loss alone
    other = TARGET.clone()
    other[0, 1] = 100.0
    assert masked_mse(PRED, other, MASK).item() == pytest.approx(expected, rel=1e-6)
    # all removed: the plain mean over every patch
    all_mse = (0.5 + 0.5 * (4 + 9) + 4.5 + 12.5) / 4
    assert masked_mse(PRED, TARGET, torch.ones(1, 4)).item() == pytest.approx(all_mse, rel=1e-6)


def test_norm_patches_by_hand_unbiased_variance():
    eps = 1e-6
    # patch [a, b]: mean (a+b)/2, unbiased var (a-b)^2/2 (torch .var default, as in the official code)
    s0 = 1 / math.sqrt(2 + eps)  # [0, 2]: mean 1, var 2
    s2 = 2 / math.sqrt(8 + eps)  # [2, 6]: mean 4, var 8
    s3 = 1 / math.sqrt(2 + eps)  # [3, 5]: mean 4, var 2
    expected = torch.tensor([[[-s0, s0], [0.0, 0.0], [-s2, s2], [-s3, s3]]])
    torch.testing.assert_close(norm_patches(TARGET), expected, atol=1e-7, rtol=1e-6)
    # with the normalized target: removed patches 0, 2, 3
    loss = sum(((PRED[0, i] - expected[0, i]) ** 2).mean().item() for i in (0, 2, 3)) / 3
    assert masked_mse(PRED, norm_patches(TARGET), MASK).item() == pytest.approx(loss, rel=1e-6)


def test_norm_patches_zero_mean_unit_unbiased_variance():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 48) * 3 + 7
    n = norm_patches(t)
    torch.testing.assert_close(n.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.var(-1), torch.ones(2, 5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_masked_mse_equals_starting_project_formula(ratio):
    """Old loss: mean over all pixels of (pred - target)^2 * mask, / mask_ratio; equal when every row removes
    exactly ratio * L patches."""
    torch.manual_seed(0)
    B, L, P = 3, 16, 12
    pred, target = torch.randn(B, L, P), torch.randn(B, L, P)
    _, mask, _ = random_masking(torch.zeros(B, L, 1), ratio)
    assert torch.equal(mask.sum(1), torch.full((B,), ratio * L))
    old = ((pred - target) ** 2 * mask.unsqueeze(-1)).mean() / ratio
    torch.testing.assert_close(masked_mse(pred, target, mask), old, rtol=1e-6, atol=0)


def test_masked_mse_computes_in_float32():
    """Under autocast pred arrives in bf16: the loss must still be computed (and returned) in float32."""
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 64).bfloat16(), torch.randn(2, 4, 64).bfloat16()
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    loss = masked_mse(pred, target, mask)
    assert loss.dtype == torch.float32
    per_patch = (pred.double() - target.double()).pow(2).mean(-1)  # exact reference from the same bf16 values
    ref = (per_patch * mask.double()).sum() / mask.sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
