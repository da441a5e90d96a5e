"""Correctness on a GPU: the same weights, images and mask give the same numbers on CUDA as on the CPU.

Prints one JSON object: the MAE loss and the classifier's logits on the CPU in fp32 against CUDA in fp32
(both attention kernels) and in bf16 autocast, as absolute differences. Run from the repository root:
    PYTHONPATH=src python scripts/gpu_parity.py            (part of scripts/gpu_check.sh)
"""

from __future__ import annotations

import json

import torch

from mae_torch.config import resolve
from mae_torch.tasks import build_mae, build_vit
from mae_torch.vit import set_attention


def outputs(model, x, noise, device, attention="sdpa", bf16=False):
    model = model.to(device).eval()
    set_attention(model, attention)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if noise is None:
            return model(x.to(device)).float().cpu()
        return model(x.to(device), noise=noise.to(device)).loss.float().cpu()


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides (the default; stated, not assumed)
    cfg = resolve("pretrain", "cifar10-vit-tiny-improved").model
    torch.manual_seed(0)
    mae, vit = build_mae(cfg), build_vit(cfg, 10)
    x, noise = torch.randn(64, 3, 32, 32), torch.rand(64, (32 // cfg.patch_size) ** 2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, model, n in [("mae_loss", mae, noise), ("vit_logits", vit, None)]:
        ref = outputs(model, x, n, cpu, "math")
        for label, kw in [("fp32_sdpa", {}), ("fp32_math", {"attention": "math"}), ("bf16_sdpa", {"bf16": True})]:
            report[f"{name}_{label}_max_abs_diff"] = (outputs(model, x, n, cuda, **kw) - ref).abs().max().item()
        report[f"{name}_scale"] = ref.abs().max().item()
    report["fp32_ok"] = all(v < 1e-4 for k, v in report.items() if "fp32" in k)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
