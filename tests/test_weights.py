"""The released weights in weights/ (weights/README.md): each file loads, is half precision and small, and does
what it was trained for as far as a test without CIFAR-10 can tell: the MAE reconstructs smooth images far better
than the same model untrained, and each classifier runs through `mae evaluate` on a folder of CIFAR-10's classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import mae_torch
from mae_torch.cli import main
from mae_torch.models import build_mae, load_weights, model_config_from

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
MAE = "cifar10-speedrun-mae.safetensors"
CLASSIFIERS = ["cifar10-speedrun-10pct-labels.safetensors", "cifar10-speedrun-all-labels.safetensors"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("name", [MAE, *CLASSIFIERS])
def test_file_is_small_half_precision_and_described(name):
    path = WEIGHTS / name
    assert path.stat().st_size < 20e6
    assert {v.dtype for v in load_file(str(path)).values() if v.is_floating_point()} == {torch.float16}
    _, meta = load_weights(path)
    assert model_config_from(meta).img_size == 32
    assert name.removesuffix(".safetensors") in (WEIGHTS / "README.md").read_text()


def smooth_images(n: int = 32) -> torch.Tensor:
    """Low-frequency colour fields, normalized: what natural images look like to a 4x4-patch model."""
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=32, mode="bicubic")
    return (x - x.mean()) / x.std()


def test_mae_reconstructs_far_better_than_untrained():
    model = mae_torch.load_pretrained(WEIGHTS / MAE).eval()
    assert isinstance(model, mae_torch.MaskedAutoencoder)
    torch.manual_seed(0)
    untrained = build_mae(model_config_from(load_weights(WEIGHTS / MAE)[1])).eval()
    x = smooth_images()
    with torch.no_grad():
        torch.manual_seed(1)
        trained_loss = model(x).loss.item()
        torch.manual_seed(1)
        untrained_loss = untrained(x).loss.item()
    assert trained_loss < 0.75 * untrained_loss, (trained_loss, untrained_loss)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_evaluates_on_cifar_classes(name, tmp_path, capsys):
    model = mae_torch.load_pretrained(WEIGHTS / name).eval()
    assert isinstance(model, mae_torch.ViT)
    assert load_weights(WEIGHTS / name)[1]["classes"] == CIFAR10
    rs = np.random.RandomState(0)
    for cls in CIFAR10[:3]:
        (tmp_path / "test" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rs.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "test" / cls / f"{i}.png")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(WEIGHTS / name), "--data", str(tmp_path), "--device", "cpu"]) == 0
    assert "| n 12" in capsys.readouterr().out
