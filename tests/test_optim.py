"""LARS as the official MAE code has it: the trust ratio on every parameter of two or more dimensions,
whatever the weight decay; biases and norms plain momentum SGD."""

from __future__ import annotations

import torch
from torch import nn

from mae_torch.optim import LARS


def probe() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 3)


def train(opt_kind, steps: int = 3, **kw) -> nn.Linear:
    head = probe()
    opt = opt_kind(head.parameters(), lr=0.5, momentum=0.9, **kw)
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head


def test_one_lars_step_equals_the_written_out_update():
    head = probe()
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    gw, gb = torch.randn_like(w), torch.randn_like(b)
    head.weight.grad, head.bias.grad = gw.clone(), gb.clone()
    LARS(head.parameters(), lr=0.1, weight_decay=0.05, momentum=0.9).step()
    update = gw + 0.05 * w  # decay, then the trust ratio 0.001 * |w| / |update|, on the matrix only
    expected_w = w - 0.1 * update * (1e-3 * w.norm() / update.norm())
    assert torch.allclose(head.weight, expected_w, atol=1e-7)
    assert torch.allclose(head.bias, b - 0.1 * gb, atol=1e-7)  # 1-D: no decay, no trust ratio


def test_lars_is_not_sgd_without_weight_decay():
    lars, sgd = train(LARS, weight_decay=0.0), train(torch.optim.SGD, weight_decay=0.0)
    assert not torch.allclose(lars.weight, sgd.weight, atol=1e-4)  # timm's Lars equals SGD here
    assert (lars.weight - probe().weight).abs().max() < (sgd.weight - probe().weight).abs().max()  # small steps
