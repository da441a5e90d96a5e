"""LARS (You et al. 2017) as the official MAE code has it (util/lars.py), for the linear probe.

Design decisions:
- Every parameter with two or more dimensions gets weight decay and the trust ratio
  `trust_coefficient * |w| / |g + wd * w|`, whatever the weight decay (the linear probe uses none); 1-D
  parameters (biases, norms) get neither. timm's `Lars` adapts only when weight decay is non-zero (or with
  `always_adapt`), adapts 1-D parameters too and adds an eps, so it is not the paper's probe optimizer.
- Plain momentum on the adapted update, then `w -= lr * momentum_buffer`, as the official code.
"""

from __future__ import annotations

import torch


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
