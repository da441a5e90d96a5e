"""What the optimizers need: parameter groups, the learning-rate schedule, the gradient scaler, LARS.

Design decisions:
- The learning rate is a pure function of the optimizer step (`lr_at`): linear warmup, then half-cosine;
  the engine and the linear probe set it every step.
- Training's optimizer is `adamw`: AdamW over those groups, fused on CPUs and CUDA GPUs (one kernel for every
  parameter); `mae bench` times the same optimizer.
- Weight decay skips biases, norms (1-D) and what a model's `no_weight_decay()` names; layer-wise lr decay is
  timm's (`param_groups_layer_decay`), as the paper's fine-tuning.
- LARS (You et al. 2017) as the official MAE code has it (util/lars.py), for the linear probe: every
  parameter with two or more dimensions gets weight decay and the trust ratio
  `trust_coefficient * |w| / |g + wd * w|`, whatever the weight decay (the linear probe uses none); 1-D
  parameters (biases, norms) get neither. timm's `Lars` adapts only when weight decay is non-zero (or with
  `always_adapt`), adapts 1-D parameters too and adds an eps, so it is not the paper's probe optimizer.
  Plain momentum on the adapted update, then `w -= lr * momentum_buffer`, as the official code.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from .config import TrainConfig


def lr_at(step: int, total: int, warmup: int, peak: float, minimum: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then half-cosine down to `minimum` at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on biases, norms (1-D) and the names in `model.no_weight_decay()` (positions; the
    CLS token of a classifier, as the official fine-tuning); frozen ones left out.

    layer_decay < 1: timm's layer-wise lr decay (BEiT, the paper's fine-tuning): block i's lr is scaled by
    layer_decay^(depth - i), the embeddings' by layer_decay^(depth + 1); groups carry `lr_scale`."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay < 1:
        return param_groups_layer_decay(model, weight_decay, skip, layer_decay=layer_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_on(device: torch.device) -> bool:
    """Where PyTorch's fused AdamW kernel runs."""
    return device.type in ("cpu", "cuda")


def adamw(model: nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Training's optimizer: the config's weight decay, layer decay, peak lr and betas."""
    return torch.optim.AdamW(
        param_groups(model, tc.weight_decay, tc.layer_decay),
        lr=tc.peak_lr,
        betas=tc.betas,
        fused=fused_adamw_on(device),
    )


def scaler_for(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; for bf16 and fp32 a scale fixed at 1 still finds non-finite gradients and,
    with a fused optimizer, skips that step's update on the device."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)  # powers of 2: exact


class LARS(torch.optim.Optimizer):
    def __init__(
        self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient=1e-3
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:  # not a bias or a norm's scale/shift
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(w_norm)
                    q = torch.where(
                        w_norm > 0, torch.where(d_norm > 0, g["trust_coefficient"] * w_norm / d_norm, one), one
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss
