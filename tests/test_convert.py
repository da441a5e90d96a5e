"""Weights in and out (convert.py): parity with transformers' ViTMAE and timm, exact round trips through every
format, loading pickles without running code, position tables for another grid, one-channel models.

Every model is tiny and random (no downloads); everything runs on the CPU in a few seconds. Random weights
everywhere (position tables, LayerNorms, mask token included), so a misplaced tensor changes the numbers.
"""

import argparse
import json
import os
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from mae_torch.config import ModelConfig
from mae_torch.convert import (
    Weights,
    build,
    convert,
    description,
    detect_format,
    load_pretrained,
    read,
    read_hf,
    read_official,
    read_ours,
    write_hf,
    write_ours,
    write_timm,
)
from mae_torch.errors import MAEError
from mae_torch.mae import MaskedAutoencoder
from mae_torch.models import build_mae, build_vit, load_encoder, load_encoder_for
from mae_torch.ops import random_masking, sincos_pos_embed
from mae_torch.resize import adapt_state, resize_pos_embed
from mae_torch.vit import ViT

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
TINY_DECODER = dict(decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
L = (16 // 4) ** 2  # patches of TINY


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, frozen: bool = True) -> torch.nn.Module:
    """Every tensor random and of unit-ish scale, so that any mix-up of names or halves shows in the outputs;
    frozen=False keeps the fixed sin-cos tables."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not (frozen or p.requires_grad):
            continue
        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0))
    return model.eval()


def tiny_cfg(**kw) -> ModelConfig:
    cfg = ModelConfig(**{**TINY, **TINY_DECODER, **kw})
    if cfg.in_chans != 3:
        cfg.mean, cfg.std = (0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans
    cfg.validate()
    return cfg


def tiny_mae_weights(**kw) -> Weights:
    cfg = tiny_cfg(**kw)
    return Weights(randomize(build_mae(cfg), frozen=False).state_dict(), cfg, "mae", 0, ["cat", "dog"])


def tiny_vit_weights(num_classes: int = 5, **kw) -> Weights:
    cfg = tiny_cfg(**kw)
    vit = randomize(build_vit(cfg, num_classes), frozen=False)
    return Weights(vit.state_dict(), cfg, "vit", num_classes, list("abcde"))


def assert_same_weights(a: Weights, b: Weights) -> None:
    assert set(a.state) == set(b.state)
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k
    assert asdict(a.model) == asdict(b.model)
    assert (a.arch, a.num_classes, a.classes) == (b.arch, b.num_classes, b.classes)


# ---------------------------------------------------------------- parity with transformers' ViTMAE


HF_TINY = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2)
HF_TINY.update(num_attention_heads=2, intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1)
HF_TINY.update(decoder_num_attention_heads=2, decoder_intermediate_size=64, layer_norm_eps=1e-6, mask_ratio=0.75)


def hf_config(norm_pix_loss: bool = False, **kw):
    transformers = pytest.importorskip("transformers")
    return transformers.ViTMAEConfig(**{**HF_TINY, "norm_pix_loss": norm_pix_loss, **kw})


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_same_weights_and_noise_give_transformers_loss_and_predictions(norm_pix_loss):
    transformers = pytest.importorskip("transformers")
    theirs = randomize(transformers.ViTMAEForPreTraining(hf_config(norm_pix_loss)))
    w = read_hf(theirs.state_dict(), theirs.config.to_dict())
    assert (w.arch, w.model.num_heads, w.model.decoder_num_heads, w.model.norm_pix_loss) == ("mae", 2, 2, norm_pix_loss)
    ours = build(w)  # strict: every tensor has a place
    assert isinstance(ours, MaskedAutoencoder)
    x, noise = torch.randn(3, 3, 16, 16), torch.rand(3, L)
    with torch.no_grad():
        out, ref = ours(x, noise=noise), theirs(pixel_values=x, noise=noise)
        latent, _, _ = ours.forward_encoder(x, 0.75, noise)
        ref_latent = theirs.vit(pixel_values=x, noise=noise).last_hidden_state
    assert out.pred.std() > 0.1  # not degenerate
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred, ref.logits, atol=1e-5, rtol=0)
    assert torch.equal(out.mask, ref.mask)
    torch.testing.assert_close(latent, ref_latent, atol=1e-5, rtol=0)


def test_transformers_encoder_features_match_ours():
    transformers = pytest.importorskip("transformers")
    x = torch.randn(2, 3, 16, 16)
    theirs = randomize(transformers.ViTMAEModel(hf_config(mask_ratio=0.75)), seed=1)
    vit = build(read_hf(theirs.state_dict(), theirs.config.to_dict()))
    assert isinstance(vit, ViT) and vit.num_classes == 0 and vit.global_pool == "cls"
    noise = torch.rand(2, L)
    with torch.no_grad():
        kept, mask, _ = random_masking(vit.embed_patches(x), 0.75, noise)
        torch.testing.assert_close(
            vit.forward_tokens(kept), theirs(x, noise=noise).last_hidden_state, atol=1e-5, rtol=0
        )
        # no masking, and noise in patch order: every patch, in order, is exactly forward_features
        theirs.config.mask_ratio = 0.0
        ordered = torch.arange(L).float().expand(2, L)
        ref = theirs(x, noise=ordered).last_hidden_state
        torch.testing.assert_close(vit.forward_features(x), ref, atol=1e-5, rtol=0)


def test_sincos_table_is_transformers_table():
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTMAEForPreTraining(hf_config(decoder_hidden_size=16, decoder_intermediate_size=32))
    # transformers 5 leaves a freshly built model's tables at zero; its decoder's initializer fills the sin-cos
    # table (the encoder's builds the same one), as transformers 4 did at construction.
    model.decoder.initialize_weights(L)
    assert model.decoder.decoder_pos_embed.abs().max() > 0.5
    torch.testing.assert_close(model.decoder.decoder_pos_embed[0], sincos_pos_embed(16, 4), atol=1e-6, rtol=0)


def test_transformers_hub_names_and_v5_saves_read_alike(tmp_path):
    transformers = pytest.importorskip("transformers")
    theirs = randomize(transformers.ViTMAEForPreTraining(hf_config()))
    theirs.save_pretrained(tmp_path / "hf")
    from_memory = read_hf(theirs.state_dict(), theirs.config.to_dict())
    assert detect_format(tmp_path / "hf") == "hf"
    assert_same_weights(read(tmp_path / "hf"), from_memory)
    # the hub's names (transformers 4 saves; 5.x writes the decoder's blocks as decoder.decoder_encoder.layer.i)
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    hub = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in saved.items()}
    assert {
        "vit.encoder.layer.1.attention.attention.query.weight",
        "decoder.decoder_layers.0.output.dense.bias",
    } <= set(hub)
    assert_same_weights(read_hf(hub, theirs.config.to_dict()), from_memory)


def test_transformers_default_eps_is_kept(tmp_path):
    """A ViTMAE with transformers' default layer_norm_eps (1e-12), through save_pretrained and our loader: the same
    loss. Its embeddings are scaled down (LayerNorm inputs of small variance, as in a fresh model), where our
    1e-6 would move the loss by ~1e-2."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(**{k: v for k, v in HF_TINY.items() if k != "layer_norm_eps"})
    assert config.layer_norm_eps == 1e-12
    theirs = randomize(transformers.ViTMAEForPreTraining(config))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "embeddings" in name:
                p.mul_(0.01)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert all(m.eps == 1e-12 for m in ours.modules() if isinstance(m, torch.nn.LayerNorm))
    x, noise = torch.randn(3, 3, 16, 16), torch.rand(3, L)
    with torch.no_grad():
        loss, ref = ours(x, noise=noise).loss, theirs(pixel_values=x, noise=noise).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)


def test_transformers_model_without_qkv_bias_converts():
    transformers = pytest.importorskip("transformers")
    theirs = randomize(transformers.ViTMAEForPreTraining(hf_config(qkv_bias=False)))
    w = read_hf(theirs.state_dict(), theirs.config.to_dict())
    assert w.model.qkv_bias is False and not any(k.endswith("qkv.bias") for k in w.state)
    x, noise = torch.randn(3, 3, 16, 16), torch.rand(3, L)
    with torch.no_grad():
        loss, ref = build(w)(x, noise=noise).loss, theirs(pixel_values=x, noise=noise).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    # without a config the keys tell: no qkv bias tensors, no qkv bias
    assert read_hf(theirs.state_dict(), num_heads=2, decoder_num_heads=2).model.qkv_bias is False


# ---------------------------------------------------------------- parity with timm


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_exported_classifier_gives_timm_features_and_logits(tmp_path, pool):
    w = tiny_vit_weights(global_pool=pool)
    ours = build(w)
    write_timm(w, tmp_path / "vit.safetensors")
    timm_vit = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
        num_classes=5, global_pool="token" if pool == "cls" else "avg",
    )  # fmt: skip
    timm_vit.load_state_dict(load_file(str(tmp_path / "vit.safetensors")), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), timm_vit.eval().forward_features(x), atol=1e-5, rtol=0)
        logits = ours(x)
        assert logits.std() > 0.1
        torch.testing.assert_close(logits, timm_vit(x), atol=1e-5, rtol=0)


def test_exported_mae_encoder_gives_timm_features(tmp_path):
    w = tiny_mae_weights()
    write_timm(w, tmp_path / "enc.safetensors")
    timm_vit = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0
    )
    timm_vit.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=True)  # no decoder left
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(build(w).forward_features(x), timm_vit.eval().forward_features(x), atol=1e-5, rtol=0)


def test_plain_timm_state_dict_is_recognized_and_loaded(tmp_path):
    timm_vit = randomize(
        VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=1, num_classes=3)
    )
    save_file(timm_vit.state_dict(), str(tmp_path / "timm.safetensors"))
    assert detect_format(tmp_path / "timm.safetensors") == "timm"
    with pytest.raises(MAEError, match="num_heads 3 does not divide"):
        read(tmp_path / "timm.safetensors", num_heads=3)
    vit = load_pretrained(tmp_path / "timm.safetensors")  # heads not stored: 64 wide -> one 64-wide head
    assert vit.blocks[0].attn.num_heads == 1
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), timm_vit(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- round trips


def through(w: Weights, fmt: str, tmp_path, name: str = "w") -> Weights:
    """ours -> fmt -> ours, by files and the `convert` entry point."""
    a = write_ours(w, tmp_path / f"{name}-a.safetensors")
    mid = tmp_path / {"official": f"{name}.pth", "hf": f"{name}-hf", "timm": f"{name}-timm.safetensors"}[fmt]
    convert(a, "ours", mid, fmt)
    b = convert(mid, fmt, tmp_path / f"{name}-b.safetensors", "ours")
    return read_ours(b)


@pytest.mark.parametrize("fmt", ["official", "hf", "timm"])
def test_mae_round_trips_exactly(tmp_path, fmt):
    if fmt == "hf":
        pytest.importorskip("transformers")
    w = tiny_mae_weights(norm_pix_loss=True, mask_ratio=0.6, pos_embed="learned")
    back = through(w, fmt, tmp_path)
    if fmt == "timm":  # the encoder travels, described as a cls-pooled ViT
        encoder = {k: v for k, v in w.state.items() if not k.startswith(("decoder_", "mask_token"))}
        w = Weights(encoder, ModelConfig(**{**asdict(w.model), "global_pool": "cls"}), "vit", 0, None)
    if fmt == "hf":  # transformers' files keep no class names (an MAE's are its pretraining data's)
        w = w._replace(classes=None)
    assert_same_weights(back, w)


@pytest.mark.parametrize("fmt", ["ours", "official", "hf", "timm"])
def test_half_precision_export_halves_the_file_and_keeps_the_outputs(tmp_path, fmt):
    if fmt == "hf":
        pytest.importorskip("transformers")
    src = write_ours(tiny_vit_weights(num_classes=0, global_pool="cls"), tmp_path / "src.safetensors")
    mid = tmp_path / {"ours": "h.safetensors", "official": "h.pth", "hf": "h-hf", "timm": "h-timm.safetensors"}[fmt]
    convert(src, "ours", mid, fmt, dtype="float16")
    half = read(mid, fmt)
    assert {v.dtype for v in half.state.values() if v.is_floating_point()} == {torch.float16}
    back = convert(mid, fmt, tmp_path / "back.safetensors", "ours")  # keep: still half
    assert {v.dtype for v in load_file(str(back)).values()} == {torch.float16}
    full = read_ours(src)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want, got = build(full)(x), build(read_ours(back))(x)  # half weights, loaded into a float32 model
    assert got.dtype == torch.float32 and (got - want).abs().max() < 1e-2 * want.abs().max()
    if fmt == "ours":
        assert back.stat().st_size < 0.6 * src.stat().st_size
    with pytest.raises(MAEError, match="unknown dtype"):
        convert(src, "ours", tmp_path / "x.safetensors", "ours", dtype="int8")


def test_norm_eps_and_qkv_bias_survive_transformers_round_trip(tmp_path):
    pytest.importorskip("transformers")
    w = tiny_mae_weights(norm_eps=1e-12, qkv_bias=False)
    back = through(w, "hf", tmp_path)
    assert (back.model.norm_eps, back.model.qkv_bias) == (1e-12, False)
    assert_same_weights(back, w._replace(classes=None))
    config = json.loads((tmp_path / "w-hf" / "config.json").read_text())  # what transformers builds from
    assert (config["layer_norm_eps"], config["qkv_bias"]) == (1e-12, False)


def test_old_metadata_without_new_keys_loads_with_defaults(tmp_path):
    """Files written before norm_eps and qkv_bias existed: the defaults (their values then) apply; an unknown key
    is still an error."""
    w = tiny_mae_weights()
    meta = description(w)
    del meta["model"]["norm_eps"], meta["model"]["qkv_bias"]
    save_file(w.state, str(tmp_path / "old.safetensors"), metadata={"mae_torch": json.dumps(meta)})
    assert_same_weights(read_ours(tmp_path / "old.safetensors"), w)
    meta["model"]["layer_scale"] = 1.0
    save_file(w.state, str(tmp_path / "odd.safetensors"), metadata={"mae_torch": json.dumps(meta)})
    with pytest.raises(MAEError, match="unknown key 'layer_scale'"):
        read_ours(tmp_path / "odd.safetensors")


@pytest.mark.parametrize("fmt", ["official", "timm"])
@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_classifier_round_trips_exactly(tmp_path, fmt, pool):
    w = tiny_vit_weights(global_pool=pool)
    assert_same_weights(through(w, fmt, tmp_path), w)


def test_hf_export_is_what_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    w = tiny_mae_weights(norm_pix_loss=True)
    write_hf(w, tmp_path / "hf")
    names = set(load_file(str(tmp_path / "hf" / "model.safetensors")))  # the hub's, which transformers 4 and 5 load
    assert {"vit.encoder.layer.1.attention.attention.key.bias", "decoder.decoder_layers.0.output.dense.bias"} <= names
    theirs = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, L)
    with torch.no_grad():
        out, ref = build(w)(x, noise=noise), theirs(pixel_values=x, noise=noise)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred, ref.logits, atol=1e-5, rtol=0)


def test_hf_reader_rejects_other_models():
    transformers = pytest.importorskip("transformers")
    theirs = transformers.ViTMAEModel(hf_config())
    with pytest.raises(MAEError, match="classifier.weight"):
        read_hf({**theirs.state_dict(), "classifier.weight": torch.zeros(2, 32)}, theirs.config.to_dict())
    with pytest.raises(MAEError, match="GELU"):
        read_hf(theirs.state_dict(), {**theirs.config.to_dict(), "hidden_act": "relu"})


def test_hf_refuses_a_classifier(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(MAEError, match="--to timm"):
        write_hf(tiny_vit_weights(), tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["official", "hf", "timm"])
def test_one_channel_model_round_trips_and_runs(tmp_path, fmt):
    if fmt == "hf":
        pytest.importorskip("transformers")
    w = tiny_mae_weights(in_chans=1) if fmt != "timm" else tiny_vit_weights(in_chans=1, global_pool="cls")
    back = through(w, fmt, tmp_path)
    assert_same_weights(back, w if fmt != "hf" else w._replace(classes=None))
    model = build(back)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 16, 16))
    assert torch.isfinite(out.loss if fmt != "timm" else out).all()


def test_formats_are_recognized(tmp_path):
    w = tiny_mae_weights()
    write_ours(w, tmp_path / "ours.safetensors")
    convert(tmp_path / "ours.safetensors", "auto", tmp_path / "official.pth", "official")
    torch.save(w.state, tmp_path / "bare.pth")  # a bare state dict in our (= timm's) names
    assert detect_format(tmp_path / "ours.safetensors") == "ours"
    assert detect_format(tmp_path / "official.pth") == "official"
    assert detect_format(tmp_path / "bare.pth") == "timm"
    assert isinstance(load_pretrained(tmp_path / "official.pth"), MaskedAutoencoder)
    assert isinstance(load_pretrained(tmp_path / "bare.pth", num_heads=2, decoder_num_heads=2), MaskedAutoencoder)


# ---------------------------------------------------------------- official checkpoints, safely


def test_official_checkpoint_with_pickled_args(tmp_path):
    w = tiny_mae_weights(norm_pix_loss=True, mask_ratio=0.6)
    args = argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.6, norm_pix_loss=True, input_size=16, lr=None)
    torch.save({"model": w.state, "args": args, "epoch": 3, "optimizer": {"state": {}}}, tmp_path / "ckpt.pth")
    assert detect_format(tmp_path / "ckpt.pth") == "official"
    with pytest.raises(MAEError, match="--num-heads"):  # 32 wide: no official size, not a multiple of 64
        read(tmp_path / "ckpt.pth")
    got = read_official(tmp_path / "ckpt.pth", num_heads=2, decoder_num_heads=2)
    assert (got.model.mask_ratio, got.model.norm_pix_loss, got.arch) == (0.6, True, "mae")
    assert all(torch.equal(got.state[k], v) for k, v in w.state.items()) and set(got.state) == set(w.state)
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, L)
    with torch.no_grad():
        torch.testing.assert_close(build(got)(x, noise=noise).loss, build(w)(x, noise=noise).loss, atol=0, rtol=0)
    gray = tiny_vit_weights(in_chans=1, num_classes=0, global_pool="cls")  # no description: mean and std guessed
    torch.save({"model": gray.state, "args": args}, tmp_path / "gray.pth")
    got = read_official(tmp_path / "gray.pth", num_heads=2)
    assert (got.arch, got.model.in_chans, len(got.model.mean), len(got.model.std)) == ("vit", 1, 1, 1)


class Payload:
    """A pickle that acts when loaded: what an unsafe torch.load of a hostile checkpoint would run."""

    def __init__(self, how: str, target: str):
        self.how, self.target = how, target

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.target}",)
        return open, (self.target, "w")


@pytest.mark.parametrize("how", ["system", "open"])
@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_does_not_run(tmp_path, how, zipped):
    target = tmp_path / "pwned"
    ckpt = {"model": tiny_mae_weights().state, "args": Payload(how, str(target))}
    torch.save(ckpt, tmp_path / "evil.pth", _use_new_zipfile_serialization=zipped)
    for attempt in (lambda: read(tmp_path / "evil.pth"), lambda: read_official(tmp_path / "evil.pth")):
        with pytest.raises(MAEError, match="never runs code") as e:
            attempt()
        assert "\n" not in str(e.value)
    assert not target.exists()


# ---------------------------------------------------------------- another grid


def test_sincos_table_regenerated_for_new_grid():
    table = sincos_pos_embed(32, 4).unsqueeze(0)
    assert torch.equal(resize_pos_embed(table, 8), sincos_pos_embed(32, 8).unsqueeze(0))  # recognized by value
    assert torch.equal(resize_pos_embed(torch.zeros(1, 17, 32), 8, kind="sincos"), sincos_pos_embed(32, 8)[None])


def test_learned_table_resized_bicubically_keeps_cls_row_and_layout():
    rows = torch.arange(4.0).repeat_interleave(4)  # grid position (r, c) -> r: a ramp down the rows
    table = torch.cat([torch.full((1, 8), 7.0), rows[:, None].expand(16, 8)]).unsqueeze(0)  # (1, 17, 8)
    out = resize_pos_embed(table, 6)
    assert out.shape == (1, 37, 8)
    assert torch.equal(out[:, 0], table[:, 0])  # CLS row kept
    grid = out[0, 1:, 0].reshape(6, 6)
    torch.testing.assert_close(grid, grid[:, :1].expand(6, 6))  # constant along each row: rows stay rows
    assert (grid[1:, 0] > grid[:-1, 0]).all() and grid[0, 0] < 0.5 and grid[-1, 0] > 2.5
    assert torch.equal(resize_pos_embed(table, 4), table)


@pytest.mark.parametrize("kind", ["sincos", "learned"])
def test_vit_for_32px_loads_16px_weights(kind):
    src = randomize(ViT(**TINY, pos_embed=kind))
    if kind == "sincos":  # randomize touched the fixed table: put it back
        src.pos_embed.data.copy_(sincos_pos_embed(32, 4)[None])
    dst = ViT(**{**TINY, "img_size": 32}, pos_embed=kind, num_classes=10)
    load_encoder_for(dst, src.state_dict())
    assert dst.pos_embed.shape == (1, 65, 32)
    if kind == "sincos":
        assert torch.equal(dst.pos_embed, sincos_pos_embed(32, 8)[None])
    else:
        assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    with torch.no_grad():
        assert dst(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(MAEError, match="size mismatch"):  # without adapting, the table does not fit
        load_encoder(ViT(**{**TINY, "img_size": 32}), src.state_dict())


def test_new_patch_size_for_an_encoder_only():
    src = tiny_mae_weights().state  # the encoder of an MAE, its decoder left behind
    dst = ViT(**{**TINY, "img_size": 32, "patch_size": 8})  # another patch and image size
    load_encoder_for(dst, src)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src["blocks.0.attn.qkv.weight"])
    assert dst.patch_embed.proj.weight.shape == (32, 3, 8, 8) and dst.pos_embed.shape == (1, 17, 32)
    with torch.no_grad():
        assert torch.isfinite(dst.forward_features(torch.randn(1, 3, 32, 32))).all()
    with pytest.raises(MAEError, match="encoder only"):
        adapt_state(tiny_mae_weights().state, 32, 8)


def test_finetune_from_an_official_checkpoint_on_smaller_images(tmp_path):
    """The README recipe: official-format MAE weights (here a small random model saved the official way) fine-tuned
    on images of another size, positions and patch kernel resized, through the CLI."""
    import argparse

    import numpy as np
    from PIL import Image

    from mae_torch.cli import main
    from mae_torch.mae import MaskedAutoencoder

    torch.manual_seed(0)
    mae = MaskedAutoencoder(32, 8, 3, 64, 2, 1, 4.0, "sincos", 32, 1, 1)  # "pretrained" on 32px, 8px patches
    torch.save(
        {"model": mae.state_dict(), "args": argparse.Namespace(mask_ratio=0.75, norm_pix_loss=False), "epoch": 799},
        tmp_path / "official.pth",
    )
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(20):
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(
                tmp_path / "data" / f"c{c}" / f"{i}.png"
            )
    run = tmp_path / "ft"
    args = [
        "finetune",
        "--preset",
        "smoke",
        "--data",
        tmp_path / "data",
        "--pretrained",
        tmp_path / "official.pth",
        "--num-heads",
        "1",
        "--img-size",
        "16",
        "--patch-size",
        "4",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--out",
        run,
    ]
    assert main([str(a) for a in args]) == 0
    saved = load_file(str(run / "model.safetensors"))
    assert saved["pos_embed"].shape == (1, 17, 64) and saved["patch_embed.proj.weight"].shape == (64, 3, 4, 4)
    assert torch.allclose(saved["blocks.1.mlp.fc2.bias"], mae.state_dict()["blocks.1.mlp.fc2.bias"], atol=1e-2)
