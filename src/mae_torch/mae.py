"""The Masked Autoencoder: a ViT encoder that sees only the visible patches, a light decoder, the loss.

Design decisions:
- `MaskedAutoencoder` *is* a `ViT` (it inherits the encoder) so that its state dict has exactly the keys
  of the official MAE pretraining checkpoints: encoder keys at top level, then `decoder_embed`,
  `mask_token`, `decoder_pos_embed`, `decoder_blocks.{i}`, `decoder_norm`, `decoder_pred`. The encoder is
  used only through its public methods (`embed_patches`, `forward_tokens`; `run_block` for the decoder
  blocks, so that `set_grad_checkpointing` covers them too).
- Masking is `ops.random_masking` on the input's device; `forward` takes `mask_ratio` and `noise` overrides
  (same noise => same mask, as in transformers' ViTMAE).
- The loss is the mean squared error over removed patches only (Sec. 3 of the paper); with
  `norm_pix_loss` the target is each patch normalized by its own mean and variance.
- The decoder predicts each patch's pixels in (p, p, c) order, the order of `ops.patchify`.
- Training calls `forward(..., pred_visible=False)`: the last decoder block then runs for the removed
  patches' tokens only (`block_at`; every token is still a key and a value), the only outputs the loss reads.
  Same loss and gradients; about a fifth less work in that block at a mask ratio of 0.75 (docs/benchmarks-log.md).

Legend: B batch, L patches, K kept patches, D encoder width, E decoder width, P = p*p*C pixels per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from .ops import masked_mse, norm_patches, patchify, random_masking, take_rows
from .vit import ViT, init_pos_embed, init_weights


@dataclass
class MAEOutput:
    """What `MaskedAutoencoder.forward` returns; with pred_visible=False, `pred` is 0 at visible patches."""

    loss: torch.Tensor  # scalar: MSE over removed patches
    pred: torch.Tensor  # (B, L, P): predicted pixels of every patch (in the target's space)
    mask: torch.Tensor  # (B, L): 1 = removed, 0 = visible


class MaskedAutoencoder(ViT):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pos_embed: str = "sincos",
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
    ):
        encoder = (img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, pos_embed)
        super().__init__(*encoder, norm_eps=norm_eps, qkv_bias=qkv_bias)
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        num_patches, norm_layer = self.patch_embed.num_patches, partial(nn.LayerNorm, eps=norm_eps)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        init_pos_embed(self.decoder_pos_embed, pos_embed, self.grid_size)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        """As the official pretraining (timm's add_weight_decay without a skip list): the CLS and mask tokens
        are decayed, learned positions are not (sin-cos ones are frozen); biases and norms are 1-D."""
        return {"pos_embed", "decoder_pos_embed"}

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only: latent (B, 1 + K, D), mask (B, L), ids_restore (B, L)."""
        x = self.embed_patches(imgs)  # (B, L, D)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (B, K, D)
        return self.forward_tokens(x), mask, ids_restore

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Latent (B, 1 + K, D) -> predicted pixels of every patch, (B, L, P); with `rows` (B, M) patch indices,
        of those patches only, (B, M, P): the last block then runs for those tokens alone."""
        x = self.decoder_embed(latent)  # (B, 1 + K, E)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)  # (B, L - K, E)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, E), shuffled order: kept first
        x_ = take_rows(x_, ids_restore)  # patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + L, E)
        last = len(self.decoder_blocks) - (rows is not None)
        for block in self.decoder_blocks[:last]:
            x = self.run_block(block, x)  # checkpointed if set_grad_checkpointing
        if rows is None:
            return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop CLS: (B, L, P)
        x = self.run_block(partial(block_at, self.decoder_blocks[-1]), x, rows + 1)  # + 1: after CLS
        return self.decoder_pred(self.decoder_norm(x))  # (B, M, P)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder learns to predict: the patches' pixels, normalized per patch if norm_pix_loss."""
        target = patchify(imgs, self.patch_size)  # (B, L, P)
        return norm_patches(target) if self.norm_pix_loss else target

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        pred_visible: bool = True,
    ) -> MAEOutput:
        """pred_visible=False skips the work only the visible patches' predictions need (their tokens in the
        last decoder block; the loss never reads them): the same loss and gradients for less compute, and
        `pred` is 0 at visible patches. Training takes this path."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        if pred_visible:
            pred = self.forward_decoder(latent, ids_restore)
        else:
            removed = torch.argsort(ids_restore, dim=1)[:, latent.shape[1] - 1 :]  # (B, L - K), as masked
            pred_removed = self.forward_decoder(latent, ids_restore, removed)  # (B, L - K, P)
            index = removed.unsqueeze(-1).expand(-1, -1, pred_removed.shape[-1])
            pred = pred_removed.new_zeros(*mask.shape, pred_removed.shape[-1]).scatter(1, index, pred_removed)
        return MAEOutput(loss=masked_mse(pred, self.target(imgs), mask), pred=pred, mask=mask)


def block_at(block: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """timm `Block`'s output at the tokens `rows` (B, M) of x (B, N, E) only, (B, M, E): every token is still a
    key and a value, only the rows are queries. For MAE's own decoder blocks (no layer scale, drop path or
    query-key norm); tests/test_model.py checks it against the block."""
    attn = block.attn
    B, N, E = x.shape
    heads, w, b = attn.num_heads, attn.qkv.weight, attn.qkv.bias
    h = block.norm1(x)
    k, v = F.linear(h, w[E:], None if b is None else b[E:]).view(B, N, 2, heads, -1).permute(2, 0, 3, 1, 4)
    x, h = take_rows(x, rows), take_rows(h, rows)  # (B, M, E)
    q = F.linear(h, w[:E], None if b is None else b[:E]).view(B, -1, heads, k.shape[-1]).transpose(1, 2)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:  # matmul + softmax, as timm's Attention when fused_attn is off
        o = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    x = x + attn.proj(o.transpose(1, 2).reshape(B, -1, E))
    return x + block.mlp(block.norm2(x))
