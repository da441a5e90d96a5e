"""Weights from the Hugging Face Hub (`hf-hub:` references: hub.py, convert.py, models.py) and models by name
(zoo.py: create_model, list_models).

The Hub tests run huggingface_hub's own download code, offline, against a cache this file writes in the Hub's
layout (models--ORG--NAME/refs/REVISION holding a commit hash, snapshots/COMMIT/the files): one repository of
each kind (transformers' ViTMAE, timm's ViT, mae-torch's own) holding tiny random models, whose outputs must be
the source models'. No network is needed or used.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

import mae_torch
from mae_torch import zoo
from mae_torch.cli import main
from mae_torch.config import ModelConfig
from mae_torch.convert import detect_format, load_pretrained, read
from mae_torch.errors import MAEError
from mae_torch.hub import resolve_ref
from mae_torch.mae import MaskedAutoencoder
from mae_torch.models import build_mae, build_vit, load_weights
from mae_torch.runtime import save_weights
from mae_torch.vit import ViT

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
TINY_DECODER = dict(decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
L = (16 // 4) ** 2  # patches of TINY
HF_TINY = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2)
HF_TINY.update(num_attention_heads=2, intermediate_size=64, decoder_hidden_size=24, decoder_num_hidden_layers=1)
HF_TINY.update(decoder_num_attention_heads=2, decoder_intermediate_size=48, mask_ratio=0.75, norm_pix_loss=True)
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random (norms around 1), so that a misplaced tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0))
    return model.eval()


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from the environment
    once, when first imported (timm imports it before any test runs): the environment is set for processes
    started here, its constants for this one."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def snapshot(cache: Path, repo: str, revision: str = "main") -> Path:
    """The (new, empty) snapshot folder of `repo` at `revision` in a Hub cache, its ref pointing at it."""
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    folder = root / "snapshots" / commit
    folder.mkdir(parents=True)
    return folder


def commit_of(cache: Path, repo: str, revision: str) -> str:
    return (cache / f"models--{repo.replace('/', '--')}" / "refs" / revision).read_text()


def hf_repo(cache: Path, repo: str = "org/vit-mae-tiny", pickled: bool = False):
    """transformers' ViTMAEForPreTraining saved with save_pretrained (+ its image processor) as a Hub repo;
    `pickled`: as pytorch_model.bin only, as older repos (facebook/vit-mae-*) hold it."""
    transformers = pytest.importorskip("transformers")
    theirs = randomize(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**HF_TINY)))
    folder = snapshot(cache, repo)
    theirs.save_pretrained(folder)
    transformers.ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(folder)
    if pickled:
        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return theirs


def timm_repo(cache: Path, repo: str = "org/vit-tiny-timm") -> VisionTransformer:
    """A timm VisionTransformer (5 classes, mean pooling) as timm's push_to_hf lays it out: config.json naming
    the architecture, its model_args and pretrained_cfg, and model.safetensors."""
    theirs = randomize(VisionTransformer(**TINY, num_classes=5, global_pool="avg"), seed=1)
    folder = snapshot(cache, repo)
    save_file(theirs.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architecture": "vit_base_patch16_224",  # timm's factory name; model_args rebuild the exact shape
        "num_classes": 5,
        "num_features": 32,
        "global_pool": "avg",
        "model_args": {**TINY, "num_classes": 5, "global_pool": "avg"},
        "pretrained_cfg": {"input_size": [3, 16, 16], "crop_pct": 0.9, "mean": [0.5] * 3, "std": [0.25] * 3},
        "label_names": list("abcde"),
    }
    (folder / "config.json").write_text(json.dumps(config))
    return theirs


def ours_repo(cache: Path, repo: str = "org/mae-tiny-ours", arch: str = "mae", seed: int = 2, revision="main"):
    """mae-torch weights as `mae push --format ours` uploads them: model.safetensors (our metadata) + model.json."""
    cfg = ModelConfig(**TINY, **TINY_DECODER, pos_embed="learned", norm_pix_loss=True)
    model = randomize(build_mae(cfg) if arch == "mae" else build_vit(cfg, 2), seed)
    meta = {"arch": arch, "model": asdict(cfg), "classes": None if arch == "mae" else ["red", "green"]}
    save_weights(model, meta, snapshot(cache, repo, revision) / "model.safetensors")
    return model


def same_loss(a: MaskedAutoencoder, b, atol: float = 1e-5) -> None:
    """The same loss and predictions for the same images and mask (b may be transformers' model)."""
    x, noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.rand(3, L)
    with torch.no_grad():
        out = a(x, noise=noise)
        ref = b(pixel_values=x, noise=noise) if not isinstance(b, MaskedAutoencoder) else b(x, noise=noise)
    assert out.pred.std() > 0.1  # not degenerate
    torch.testing.assert_close(out.loss, ref.loss, atol=atol, rtol=0)
    torch.testing.assert_close(out.pred, getattr(ref, "logits", getattr(ref, "pred", None)), atol=atol, rtol=0)


# ---------------------------------------------------------------- the three kinds of repositories


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_transformers_repo_gives_transformers_loss(hub, pickled):
    theirs = hf_repo(hub, pickled=pickled)
    assert detect_format("hf-hub:org/vit-mae-tiny") == "hf"
    w = read("hf-hub:org/vit-mae-tiny")
    assert (w.arch, w.model.num_heads, w.model.decoder_num_heads) == ("mae", 2, 2)
    assert (w.model.norm_eps, w.model.norm_pix_loss, w.model.mean, w.model.std) == (
        1e-12,
        True,
        (0.5,) * 3,
        (0.25,) * 3,
    )
    ours = load_pretrained("hf-hub:org/vit-mae-tiny")
    assert isinstance(ours, MaskedAutoencoder)
    same_loss(ours, theirs)


def test_timm_repo_gives_timm_logits(hub):
    theirs = timm_repo(hub)
    assert detect_format("hf-hub:org/vit-tiny-timm") == "timm"
    w = read("hf-hub:org/vit-tiny-timm")
    # 32 wide: no head count follows from the width, so num_heads is model_args'; mean, std, crop: pretrained_cfg's
    assert (w.arch, w.num_classes, w.model.num_heads, w.model.global_pool) == ("vit", 5, 2, "avg")
    assert (w.model.mean, w.model.std, w.model.crop_pct, w.classes) == ((0.5,) * 3, (0.25,) * 3, 0.9, list("abcde"))
    ours = load_pretrained("hf-hub:org/vit-tiny-timm")
    assert isinstance(ours, ViT) and not isinstance(ours, MaskedAutoencoder)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_mae_torch_repo_loads_exactly(hub):
    source = ours_repo(hub)
    assert detect_format("hf-hub:org/mae-tiny-ours") == "ours"
    state, meta = load_weights("hf-hub:org/mae-tiny-ours")  # what evaluate, embed, ... read
    assert meta["arch"] == "mae" and set(state) == set(source.state_dict())
    same_loss(load_pretrained("hf-hub:org/mae-tiny-ours"), source, atol=0)


def test_a_revision_is_a_ref_or_a_commit(hub):
    main_model = ours_repo(hub, seed=3)
    tagged = ours_repo(hub, seed=4, revision="v1")
    commit = commit_of(hub, "org/mae-tiny-ours", "v1")
    for ref, source in [
        ("hf-hub:org/mae-tiny-ours", main_model),
        ("hf-hub:org/mae-tiny-ours@main", main_model),
        ("hf-hub:org/mae-tiny-ours@v1", tagged),
        (f"hf-hub:org/mae-tiny-ours@{commit}", tagged),
    ]:
        assert resolve_ref(ref).name == commit_of(hub, "org/mae-tiny-ours", "v1" if source is tagged else "main")
        same_loss(load_pretrained(ref), source, atol=0)
    assert resolve_ref("local/path.safetensors") == Path("local/path.safetensors")  # paths pass through


# ---------------------------------------------------------------- failures: one line, saying how to fix them


def one_line_error(capsys, argv: list) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("mae: error: "), err
    return err


def test_offline_without_a_cached_copy_is_a_one_line_error(hub, tmp_path, capsys):
    err = one_line_error(capsys, ["convert", "hf-hub:nobody/nothing", tmp_path / "x.safetensors", "--to", "ours"])
    assert f"cannot download hf-hub:nobody/nothing (HF_HUB_OFFLINE is set and no cached copy in {hub})" in err
    assert "connect once, or pass a local path" in err
    ours_repo(hub)  # cached, but not at this revision
    with pytest.raises(MAEError, match="no cached copy"):
        load_pretrained("hf-hub:org/mae-tiny-ours@v2")
    assert not (tmp_path / "x.safetensors").exists()


def test_unreachable_hub_uses_the_cache_and_else_says_no_network(hub, monkeypatch):
    """Online mode with the Hub unreachable (a closed local port): huggingface_hub falls back to the cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    source = ours_repo(hub)
    same_loss(load_pretrained("hf-hub:org/mae-tiny-ours"), source, atol=0)
    with pytest.raises(MAEError, match=r"cannot download hf-hub:nobody/nothing \(no network and no cached copy"):
        resolve_ref("hf-hub:nobody/nothing")


def test_bad_references_and_repositories_without_weights(hub):
    for ref in ("hf-hub:", "hf-hub:org/name@"):
        with pytest.raises(MAEError, match="not a Hub reference"):
            resolve_ref(ref)
    with pytest.raises(MAEError, match="not a Hub repository id"):
        resolve_ref("hf-hub:not a name!")
    (snapshot(hub, "org/config-only") / "config.json").write_text("{}")
    with pytest.raises(MAEError, match="holds no model.safetensors or pytorch_model.bin"):
        read("hf-hub:org/config-only")


# ---------------------------------------------------------------- the commands take hf-hub: references


def images(folder: Path, classes=("red", "green"), per_class: int = 2) -> Path:
    colors = {"red": (220, 30, 30), "green": (30, 200, 40)}
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), tuple(v - 20 * i for v in colors[c])).save(folder / c / f"{i}.png")
    return folder


def test_commands_take_hub_references(hub, tmp_path, capsys):
    hf_repo(hub)
    timm_repo(hub)
    ours_repo(hub, "org/vit-tiny-ours", arch="vit")
    data = images(tmp_path / "data")
    cpu = ("--device", "cpu", "--num-workers", "0")
    # transformers' MAE reconstructs (it has the decoder); timm's encoder embeds; mae-torch's classifier evaluates
    argv = ["reconstruct", "--checkpoint", "hf-hub:org/vit-mae-tiny", "--images", data, "--out", tmp_path / "r.png"]
    assert main([str(a) for a in argv]) == 0 and (tmp_path / "r.png").stat().st_size > 0
    argv = ["embed", "--checkpoint", "hf-hub:org/vit-tiny-timm", "--data", data, "--out", tmp_path / "f.npy", *cpu]
    assert main([str(a) for a in argv]) == 0
    assert np.load(tmp_path / "f.npy").shape == (4, 32)
    capsys.readouterr()
    argv = ["evaluate", "--checkpoint", "hf-hub:org/vit-tiny-ours", "--data", data, "--json", *cpu]
    assert main([str(a) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 4
    # evaluation matches classes by name: weights without mae-torch's description get the usual one-line error
    err = one_line_error(capsys, ["evaluate", "--checkpoint", "hf-hub:org/vit-mae-tiny", "--data", data, *cpu])
    assert "carries no mae-torch model description" in err


def test_a_new_process_reads_the_cache_from_the_environment(hub, tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them, read by huggingface_hub itself at import."""
    theirs = timm_repo(hub)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    argv = ["convert", "hf-hub:org/vit-tiny-timm", str(tmp_path / "x.safetensors"), "--to", "ours"]
    result = subprocess.run([sys.executable, "-m", "mae_torch", *argv], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    w = read(tmp_path / "x.safetensors")
    assert w.classes == list("abcde") and w.model.num_heads == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "x.safetensors")(x), theirs(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- models by name


OFFICIAL = {  # facebookresearch/mae models_mae.py and models_vit.py: (patch, width, depth, heads)
    "base": ("vit_base_patch16", 16, 768, 12, 12),
    "large": ("vit_large_patch16", 16, 1024, 24, 16),
    "huge": ("vit_huge_patch14", 14, 1280, 32, 16),
}
TIMM_NAMES = {"base": "vit_base_patch16_224", "large": "vit_large_patch16_224", "huge": "vit_huge_patch14_224"}
TIMM_ENCODER_PARAMS = {"base": 85_798_656, "large": 303_301_632, "huge": 630_764_800}  # timm, num_classes=0


def encoder_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without an MAE's decoder and mask token."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}


def shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in encoder_tensors(model).items()}


def test_list_models_names_them_all():
    names = mae_torch.list_models()
    assert names == sorted(zoo.MODELS) and len(names) == 8
    assert {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "vit_huge_patch14"} <= set(names)
    assert {"mae_vit_tiny_patch2_32", "vit_tiny_patch2_32"} <= set(names)
    assert mae_torch.list_models("mae_*") == [n for n in names if n.startswith("mae_")]
    assert "create_model" in mae_torch.__all__ and mae_torch.create_model is zoo.create_model


@pytest.mark.parametrize("size", list(OFFICIAL))
def test_official_names_are_the_official_architectures(size):
    timm = pytest.importorskip("timm")
    name, patch, width, depth, heads = OFFICIAL[size]
    for model_name in (name, "mae_" + name):
        m = zoo.model_config(model_name)
        assert (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads) == (224, patch, width, depth, heads)
        assert (m.mlp_ratio, m.norm_eps, m.qkv_bias, m.pos_embed) == (4.0, 1e-6, True, "sincos")
        assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    # names and shapes against timm's ViT, one block deep (every block is alike): the encoder of the MAE, and
    # the classifier as the official fine-tuning builds it (1000 classes, mean pooling through fc_norm)
    few = dict(depth=1, decoder_depth=1)
    mae = zoo.create_model("mae_" + name, **few)
    encoder = timm.create_model(TIMM_NAMES[size], pretrained=False, num_classes=0, depth=1)
    assert shapes(mae) == shapes(encoder)
    vit = zoo.create_model(name, depth=1)
    classifier = timm.create_model(TIMM_NAMES[size], pretrained=False, num_classes=1000, global_pool="avg", depth=1)
    assert shapes(vit) == shapes(classifier) and "fc_norm.weight" in shapes(vit) and vit.head.out_features == 1000
    # the full depth's parameters: the 1-block count plus depth - 1 more blocks
    block = sum(v.numel() for k, v in mae.state_dict().items() if k.startswith("blocks.0."))
    encoder_params = sum(v.numel() for v in encoder_tensors(mae).values()) + (depth - 1) * block
    assert encoder_params == TIMM_ENCODER_PARAMS[size]


def test_mae_vit_base_in_full_is_the_papers_size():
    mae = zoo.create_model("mae_vit_base_patch16")
    total = sum(v.numel() for v in mae.state_dict().values())  # fixed sin-cos tables included, as the official
    assert sum(v.numel() for v in encoder_tensors(mae).values()) == 85_798_656  # ViT-B/16: 85.8M
    assert total - 85_798_656 == 26_109_184  # the decoder (512 wide, 8 blocks) and mask token: 26.1M
    assert isinstance(mae, MaskedAutoencoder) and mae.norm_pix_loss and mae.training


def test_unknown_names_and_settings_are_one_line_errors():
    with pytest.raises(MAEError, match="unknown model 'vit_base_patch32'.*did you mean") as e:
        zoo.create_model("vit_base_patch32")
    assert "\n" not in str(e.value)
    with pytest.raises(MAEError, match="unknown setting embed_dimm for vit_tiny_patch2_32.*and num_classes"):
        zoo.create_model("vit_tiny_patch2_32", embed_dimm=8)
    with pytest.raises(MAEError, match="num_classes is a classifier's: create vit_tiny_patch2_32"):
        zoo.create_model("mae_vit_tiny_patch2_32", num_classes=10)
    with pytest.raises(MAEError, match="depth must be int"):
        zoo.create_model("vit_tiny_patch2_32", depth="twelve")
    with pytest.raises(MAEError, match="does not divide"):
        zoo.create_model("vit_tiny_patch2_32", patch_size=5)
    with pytest.raises(MAEError, match="pretrained= takes weights"):
        zoo.create_model("vit_tiny_patch2_32", pretrained=True)


def test_overrides_set_the_config():
    vit = zoo.create_model("vit_tiny_patch2_32", num_classes=100, global_pool="avg", depth=3)
    assert (vit.head.out_features, vit.global_pool, len(vit.blocks), vit.embed_dim) == (100, "avg", 3, 192)
    assert zoo.create_model("vit_tiny_patch2_32").head.out_features == 10  # the preset's CIFAR-10


def test_pretrained_loads_and_checks_the_architecture(tmp_path):
    source = randomize(zoo.create_model("mae_vit_tiny_patch2_32"), seed=5)
    file = tmp_path / "w" / "model.safetensors"
    file.parent.mkdir()
    save_weights(source, {"arch": "mae", "model": asdict(zoo.model_config("mae_vit_tiny_patch2_32"))}, file)
    mae = zoo.create_model("mae_vit_tiny_patch2_32", pretrained=file).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(mae(x, noise=noise).loss, source(x, noise=noise).loss, atol=0, rtol=0)
    # a classifier from the MAE: the encoder loads, the head starts fresh (fine-tuning's start)
    vit = zoo.create_model("vit_tiny_patch2_32", pretrained=file)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in vit.state_dict().items() if not k.startswith("head"))
    # another architecture: heads leave no trace in the shapes, yet are caught; widths and depths too
    with pytest.raises(MAEError, match=r"does not fit mae_vit_tiny_patch2_32: num_heads 3 \(weights\) vs 6;"):
        zoo.create_model("mae_vit_tiny_patch2_32", pretrained=file, num_heads=6)
    with pytest.raises(MAEError, match=r"depth 12 \(weights\) vs 6"):
        zoo.create_model("vit_tiny_patch2_32", pretrained=file, depth=6)
    classifier = tmp_path / "c.safetensors"
    save_weights(
        vit, {"arch": "vit", "model": asdict(zoo.model_config("vit_tiny_patch2_32")), "classes": None}, classifier
    )
    with pytest.raises(MAEError, match="has no decoder, and mae_vit_tiny_patch2_32 is an MAE"):
        zoo.create_model("mae_vit_tiny_patch2_32", pretrained=classifier)
    with pytest.raises(MAEError, match=r"num_classes 10 \(weights\) vs 5"):
        zoo.create_model("vit_tiny_patch2_32", pretrained=classifier, num_classes=5)


def test_pretrained_takes_hub_references(hub):
    source = ours_repo(hub)
    mae = zoo.create_model(
        "mae_vit_tiny_patch2_32", pretrained="hf-hub:org/mae-tiny-ours", **TINY, **TINY_DECODER, norm_pix_loss=True
    )
    same_loss(mae.eval(), source, atol=0)
    assert mae.pos_embed.requires_grad  # learned positions, as the weights' (the name's preset says learned too)
