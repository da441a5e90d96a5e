"""The Vision Transformer backbone: one class for pretraining, fine-tuning, linear probing and features.

Design decisions:
- Attention is timm's: fused `scaled_dot_product_attention`, or explicit matmul + softmax where that
  measured faster (CPUs); `set_attention` switches, `engine` picks per device.
- Parameter names are those of timm and of the official MAE checkpoints (`patch_embed.proj`, `cls_token`,
  `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `fc_norm`, `head`),
  so weights load with `strict=True`. The blocks are timm's `Block` (attention through
  `scaled_dot_product_attention`), by default with the official MAE settings: qkv bias, LayerNorm eps 1e-6.
  `norm_eps` and `qkv_bias` take imported weights' own (transformers' ViTMAE defaults to eps 1e-12), so their
  numbers stay theirs; without qkv bias the state dict has no `attn.qkv.bias` keys, as in timm.
- Position embeddings are a fixed 2-D sin-cos table by default (the paper), stored as a frozen parameter as
  in the official code so checkpoints carry it; `pos_embed="learned"` makes it trainable (the starting
  project's choice).
- The public API splits the forward pass so that MAE can encode only the visible patches without touching
  internals: `embed_patches` (patch tokens + positions) -> [drop tokens] -> `forward_tokens` (CLS, blocks,
  norm) -> `forward_head` (pool, fc_norm, linear head). `forward_features` = the first two on all patches.
- Pooling: `cls` (the CLS token after `norm`) or `avg` (mean of patch tokens, then `fc_norm`: the paper's
  fine-tuning default, Appendix A.2). As in timm, `norm` is an identity when pooling is `avg`.
- timm's model API, checked against timm's VisionTransformer on the same weights: `forward_intermediates`,
  `prune_intermediate_layers`, `get_classifier`, `reset_classifier` (a new pooling also gets the constructor's
  norm layout, a fresh LayerNorm, so the state dict keeps ViT(global_pool=...)'s names), `set_grad_checkpointing`
  (every block, MAE's decoder blocks too, goes through `run_block`: recomputed in backward while training).

Legend: B batch, L patches, K kept patches, D width.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .ops import sincos_pos_embed


def init_pos_embed(param: nn.Parameter, kind: str, grid: int) -> None:
    """Fill a (1, 1 + grid*grid, D) position parameter: a fixed sin-cos table, or small noise to learn."""
    if kind == "sincos":
        param.data.copy_(sincos_pos_embed(param.shape[-1], grid).unsqueeze(0))
        param.requires_grad_(False)
    elif kind == "learned":
        nn.init.trunc_normal_(param, std=0.02)
    else:
        raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {kind!r}")


def init_weights(module: nn.Module) -> None:
    """The official MAE initialisation: xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def set_attention(model: nn.Module, kind: str) -> None:
    """Attention kernel of every timm block: "sdpa" (fused `scaled_dot_product_attention`) or "math" (matmul +
    softmax, faster on CPUs in bf16: runtime.resolve_attention). Same numbers either way, up to rounding."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = kind == "sdpa"


def take_indices(depth: int, indices: int | list[int] | None) -> list[int]:
    """timm's `feature_take_indices`: the blocks to take; None = all, n = the last n, a list = those (-1 = last)."""
    if indices is None or isinstance(indices, int):
        n = depth if indices is None else indices
        if not 0 < n <= depth:
            raise ValueError(f"last-n ({n}) is out of range (1 to {depth})")
        return list(range(depth - n, depth))
    taken = [i + depth if i < 0 else i for i in indices]
    if not taken or not all(0 <= i < depth for i in taken):
        raise ValueError(f"block indices {list(indices)} are out of range (0 to {depth - 1})")
    return taken


class ViT(nn.Module):
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
        num_classes: int = 0,
        global_pool: str = "cls",
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        qkv_bias: bool = True,
    ):
        super().__init__()
        if global_pool not in ("cls", "avg"):
            raise ValueError(f"global_pool must be 'cls' or 'avg', got {global_pool!r}")
        self.patch_size, self.grid_size, self.global_pool = patch_size, img_size // patch_size, global_pool
        self.embed_dim, self.num_classes, self.norm_eps = embed_dim, num_classes, norm_eps
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer, drop_path=r) for r in rates
        )
        self.norm = norm_layer(embed_dim) if global_pool == "cls" else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()

        init_pos_embed(self.pos_embed, pos_embed, self.grid_size)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer, per the official code
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        if num_classes:
            nn.init.trunc_normal_(self.head.weight, std=2e-5)  # official fine-tuning head init

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (besides biases and norms, which are 1-D)."""
        return {"cls_token", "pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's layer-wise lr decay (as timm's ViT): embeddings, each block, then the rest."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's: a new head (initialized as the constructor's; Identity for 0 classes), and pooling `global_pool`
        ("cls" or "avg") if given. A new pooling also moves the LayerNorm where the constructor puts it (cls:
        `norm`, avg: `fc_norm`), freshly initialized as in the official fine-tuning, so the state dict has the
        keys of ViT(global_pool=...); timm instead keeps the old placement."""
        like = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        if global_pool not in (None, self.global_pool):
            if global_pool not in ("cls", "avg"):
                raise ValueError(f"global_pool must be 'cls' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
            fresh = nn.LayerNorm(self.embed_dim, eps=self.norm_eps, **like).train(self.training)
            self.norm, self.fc_norm = (fresh, nn.Identity()) if global_pool == "cls" else (nn.Identity(), fresh)
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes, **like) if num_classes else nn.Identity()
        if num_classes:
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        self.head.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (timm's; in training only):
        less memory for large models, about a third more compute, the same gradients."""
        self.grad_checkpointing = enable

    def run_block(self, block, *args: torch.Tensor) -> torch.Tensor:
        """One transformer block (encoder or decoder), through `checkpoint` when gradient checkpointing is on."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens with positions, (B, L, D); no CLS token yet."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, K, D) -> [CLS with its position, tokens], (B, 1 + K, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, K, D), any subset of them -> encoded [CLS, tokens], (B, 1 + K, D)."""
        x = self.prepend_cls(x)
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.norm(x)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All patches, unmasked: (B, C, H, W) -> (B, 1 + L, D)."""
        return self.forward_tokens(self.embed_patches(imgs))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """timm's: the outputs of blocks `indices` (see `take_indices`), after `norm` if norm, as patch tokens
        (B, D, H/p, W/p) for NCHW or (B, L, D) for NLC, each paired with its CLS token (B, 1, D) if
        return_prefix_tokens; with the final features (B, 1 + L, D) unless intermediates_only. stop_early: run
        no block after the last one taken (the final features are then that block's, normed)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = take_indices(len(self.blocks), indices)
        h, w = (side // self.patch_size for side in x.shape[-2:])
        x, taken = self.prepend_cls(self.embed_patches(x)), []
        for i, block in enumerate(self.blocks[: max(take) + 1] if stop_early else self.blocks):
            x = self.run_block(block, x)
            if i in take:
                taken.append(self.norm(x) if norm else x)
        out = [y[:, 1:] for y in taken]
        if output_fmt == "NCHW":
            out = [y.reshape(len(y), h, w, -1).permute(0, 3, 1, 2).contiguous() for y in out]
        if return_prefix_tokens:
            out = [(y, t[:, :1]) for y, t in zip(out, taken)]
        return out if intermediates_only else (self.norm(x), out)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's: drop the blocks after the last of `indices` (and `norm`, the head and fc_norm if asked), for a
        model used only through forward_intermediates; returns the block indices. Pooling stays (timm's: none)."""
        take = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0)
        return take

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + L, D) -> pooled (B, D) when pre_logits, else logits (B, num_classes)."""
        x = feats[:, 1:].mean(dim=1) if self.global_pool == "avg" else feats[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def encode(self, imgs: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """Features of whole images, no masking: (B, C, H, W) -> (B, D). pool: "cls" (the CLS token after
        norm), "avg" (mean patch token, then fc_norm if the model has one), or None for the model's own."""
        feats = self.forward_features(imgs)
        if (pool or self.global_pool) == "cls":
            return feats[:, 0]
        return self.fc_norm(feats[:, 1:].mean(dim=1))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(imgs))
