"""timm's model API on our ViT: forward_intermediates and prune_intermediate_layers against timm's own
VisionTransformer holding the same weights, get/reset_classifier, and gradient checkpointing (same gradients,
every encoder and decoder block checkpointed, the `--grad-checkpointing` flag of a CLI run).

Tiny models on the CPU, milliseconds each; the CLI run takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer

import mae_torch.vit
from mae_torch.cli import main
from mae_torch.mae import MaskedAutoencoder
from mae_torch.vit import ViT, take_indices

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
DECODER = dict(decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=2)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random (norms around 1), so that a mix-up of layers or tokens shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0))
    return model.eval()


def pair(pool: str, num_classes: int = 5) -> tuple[ViT, VisionTransformer]:
    """Our ViT and timm's of the same architecture, holding the same (random) weights."""
    ours = randomize(ViT(**SMALL, num_classes=num_classes, global_pool=pool))
    theirs = VisionTransformer(**SMALL, num_classes=num_classes, global_pool="token" if pool == "cls" else "avg")
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs.eval()


def assert_same(a, b) -> None:
    """Tensors, or lists / tuples of them nested alike, equal up to float rounding."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        return
    assert type(a) is type(b) and len(a) == len(b)
    for x, y in zip(a, b):
        assert_same(x, y)


# ---------------------------------------------------------------- forward_intermediates


@pytest.mark.parametrize("indices", [None, 1, 3, [0], [0, 2], [-1], [2, 0], (1, -1)])
def test_take_indices_are_timms(indices):
    assert take_indices(3, indices) == feature_take_indices(3, indices)[0]


@pytest.mark.parametrize("indices", [0, 4, [3], [-4], []])
def test_take_indices_out_of_range_raise(indices):
    with pytest.raises(ValueError):
        take_indices(3, indices)


@pytest.mark.parametrize("pool", ["cls", "avg"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"indices": 2},
        {"indices": [0, -1], "output_fmt": "NLC"},
        {"indices": [1], "norm": True},
        {"indices": 2, "norm": True, "return_prefix_tokens": True, "output_fmt": "NLC"},
        {"indices": [0, 2], "intermediates_only": True},
        {"indices": 1, "return_prefix_tokens": True, "intermediates_only": True},
        {"indices": [0], "stop_early": True},
        {"indices": [1], "stop_early": True, "norm": True, "output_fmt": "NLC"},
    ],
)
def test_forward_intermediates_match_timm(pool, kwargs):
    ours, theirs = pair(pool)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got, want = ours.forward_intermediates(x, **kwargs), theirs.forward_intermediates(x, **kwargs)
    assert_same(got, want)
    intermediates = got if kwargs.get("intermediates_only") else got[1]
    first = intermediates[0][0] if kwargs.get("return_prefix_tokens") else intermediates[0]
    assert first.shape == ((2, 16, 32) if kwargs.get("output_fmt") == "NLC" else (2, 32, 4, 4))
    if not kwargs.get("intermediates_only") and not kwargs.get("stop_early"):
        assert_same(got[0], ours.forward_features(x))


def test_forward_intermediates_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="output_fmt"):
        ViT(**SMALL).forward_intermediates(torch.randn(1, 3, 16, 16), output_fmt="NHWC")


@pytest.mark.parametrize("pool", ["cls", "avg"])
@pytest.mark.parametrize("prune_norm", [False, True])
def test_prune_intermediate_layers_matches_timm(pool, prune_norm):
    ours, theirs = pair(pool)
    kept = ours.prune_intermediate_layers([0, 1], prune_norm=prune_norm)
    assert kept == theirs.prune_intermediate_layers([0, 1], prune_norm=prune_norm) == [0, 1]
    assert len(ours.blocks) == 2 and ours.num_classes == 0
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_same(ours.forward_intermediates(x, norm=True), theirs.forward_intermediates(x, norm=True))
        feats = theirs.forward_features(x)
        assert_same(ours.forward_features(x), feats)
        pooled = feats[:, 0] if pool == "cls" else feats[:, 1:].mean(dim=1)
        assert_same(ours(x), pooled)  # no fc_norm, no head; timm's pruned model pools nothing (pool "")


# ---------------------------------------------------------------- classifier


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_reset_classifier_keeps_pooling_like_timm(pool):
    ours, theirs = pair(pool)
    norm, fc_norm = ours.norm, ours.fc_norm
    assert ours.get_classifier() is ours.head and ours.head.out_features == 5
    ours.reset_classifier(7)
    theirs.reset_classifier(7)
    assert ours.norm is norm and ours.fc_norm is fc_norm  # the trained norm stays
    assert ours.get_classifier() is ours.head and ours.num_classes == 7
    assert ours.head.weight.std() < 1e-4 and not ours.head.bias.any()  # the official fine-tuning init
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert ours(x).shape == (2, 7)
        assert_same(ours(x), theirs(x))
        ours.reset_classifier(0)
        theirs.reset_classifier(0)
        assert isinstance(ours.get_classifier(), torch.nn.Identity)
        assert_same(ours(x), theirs(x))
        assert_same(ours(x), ours.forward_head(ours.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("old, new", [("cls", "avg"), ("avg", "cls")])
def test_reset_classifier_with_new_pooling_has_the_constructors_layout(old, new):
    vit = randomize(ViT(**SMALL, num_classes=5, global_pool=old)).train()
    vit.reset_classifier(3, new)
    fresh = ViT(**SMALL, num_classes=3, global_pool=new)
    assert vit.global_pool == new and vit.state_dict().keys() == fresh.state_dict().keys()
    assert all(m.training for m in vit.modules())
    ln = vit.fc_norm if new == "avg" else vit.norm
    assert isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-6 and bool((ln.weight == 1).all())
    fresh.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_same(vit.eval()(x), fresh.eval()(x))


def test_reset_classifier_follows_dtype_and_rejects_unknown_pooling():
    vit = ViT(**SMALL).double()
    vit.reset_classifier(4, "avg")
    assert vit.head.weight.dtype == vit.fc_norm.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="global_pool"):
        vit.reset_classifier(4, "max")


# ---------------------------------------------------------------- gradient checkpointing


@pytest.fixture
def checkpoint_calls(monkeypatch) -> list[int]:
    """Counts the blocks run through torch.utils.checkpoint (the list grows by one per call)."""
    calls: list[int] = []
    real = mae_torch.vit.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        assert kwargs["use_reentrant"] is False
        return real(*args, **kwargs)

    monkeypatch.setattr(mae_torch.vit, "checkpoint", counting)
    return calls


def gradients(model: torch.nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(model: torch.nn.Module, loss_fn, calls: list[int], blocks: int) -> None:
    plain = gradients(model, loss_fn)
    assert not calls
    model.set_grad_checkpointing()
    checked = gradients(model, loss_fn)
    assert len(calls) == blocks  # each block went through checkpoint once
    assert plain.keys() == checked.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], atol=1e-6, rtol=0, msg=name)
    with torch.no_grad():
        loss_fn(model)  # no gradients: nothing to recompute
    loss_fn(model.eval())  # evaluation: not checkpointed
    assert len(calls) == blocks


def test_grad_checkpointing_gives_the_same_vit_gradients(checkpoint_calls):
    torch.manual_seed(0)
    vit = randomize(ViT(**SMALL, num_classes=5, global_pool="avg", drop_path=0.0)).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss = lambda model: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    assert_same_gradients(vit, loss, checkpoint_calls, blocks=3)


@pytest.mark.parametrize("pred_visible", [True, False])  # False: training's path, the last block on some rows
def test_grad_checkpointing_gives_the_same_mae_gradients(checkpoint_calls, pred_visible):
    torch.manual_seed(0)
    mae = randomize(MaskedAutoencoder(**SMALL, **DECODER)).train()
    x, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    loss = lambda model: model(x, noise=noise, pred_visible=pred_visible).loss  # noqa: E731  same noise, same mask
    assert_same_gradients(mae, loss, checkpoint_calls, blocks=3 + 2)  # encoder and decoder blocks


def write_images(root: Path, per_class: int = 12) -> Path:
    """root/<class>/<i>.png: 16x16 RGB noise, two classes."""
    rs = np.random.RandomState(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rs.randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_pretrain_cli_with_grad_checkpointing(tmp_path, checkpoint_calls):
    data, run = write_images(tmp_path / "data"), tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only spin on a busy CPU
    try:
        args = ["pretrain", "--preset", "smoke", "--num-workers", "0", "--device", "cpu", "--data", str(data)]
        assert main([*args, "--out", str(run), "--grad-checkpointing", "--epochs", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["grad_checkpointing"] is True
    assert checkpoint_calls  # the flag reached the model
    assert (run / "model.safetensors").exists()
