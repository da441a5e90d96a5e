"""The ViT backbone and the MAE wrapper: checkpoint key names, timm parity, what the encoder and decoder see,
the loss, forward+backward of every preset at tiny width, optimizer groups and the learning-rate schedule.

All models are a few thousand parameters wide and run on the CPU in milliseconds.
"""

import dataclasses
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mae_torch.config import preset_names, resolve
from mae_torch.mae import MaskedAutoencoder, block_at
from mae_torch.models import build_mae, build_vit
from mae_torch.ops import masked_mse, patchify, sincos_pos_embed
from mae_torch.optim import adamw, lr_at, param_groups
from mae_torch.vit import ViT, set_attention

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
DECODER = dict(decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=2)
L = (16 // 4) ** 2  # patches of SMALL


def small_mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(**{**SMALL, **DECODER, **kw})


def block_keys(prefix: str, depth: int) -> set[str]:
    layers = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    return {f"{prefix}.{i}.{layer}.{t}" for i in range(depth) for layer in layers for t in ("weight", "bias")}


def wb(*names: str) -> set[str]:
    return {f"{n}.{t}" for n in names for t in ("weight", "bias")}


# ---------------------------------------------------------------- parameter names


def test_mae_state_dict_keys_are_the_official_checkpoint_keys():
    expected = (
        {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
        | wb("patch_embed.proj", "norm", "decoder_embed", "decoder_norm", "decoder_pred")
        | block_keys("blocks", 2)
        | block_keys("decoder_blocks", 2)
    )
    sd = small_mae().state_dict()
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 1 + L, 32)
    assert sd["decoder_pos_embed"].shape == (1, 1 + L, 24)
    assert sd["mask_token"].shape == (1, 1, 24)
    assert sd["decoder_pred.weight"].shape == (4 * 4 * 3, 24)


def test_vit_keys_depend_on_pooling():
    common = {"cls_token", "pos_embed"} | wb("patch_embed.proj", "head") | block_keys("blocks", 2)
    avg = set(ViT(**SMALL, num_classes=10, global_pool="avg").state_dict())
    cls = set(ViT(**SMALL, num_classes=10, global_pool="cls").state_dict())
    assert avg == common | wb("fc_norm")
    assert cls == common | wb("norm")
    assert "norm.weight" not in avg and "fc_norm.weight" not in cls


def randomize(model: torch.nn.Module) -> None:
    """Every parameter random and O(1), so that outputs are far from zero and any mismatch shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("ours,theirs", [("cls", "token"), ("avg", "avg")])
def test_vit_matches_timm(ours, theirs):
    torch.manual_seed(0)
    vit = ViT(**SMALL, num_classes=10, global_pool=ours)
    randomize(vit)
    ref = VisionTransformer(**SMALL, num_classes=10, qkv_bias=True, global_pool=theirs)
    assert set(vit.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(vit.state_dict(), strict=True)
    vit.eval(), ref.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours_logits, ref_logits = vit(x), ref(x)
        ours_feats = vit.forward_head(vit.forward_features(x), pre_logits=True)
        ref_feats = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert ref_logits.abs().mean() > 0.1  # the comparison is not trivially between near-zero numbers
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_feats, ref_feats, atol=1e-5, rtol=0)
    torch.testing.assert_close(vit.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)


def test_vit_without_qkv_bias_has_no_qkv_bias_keys_and_runs():
    vit = ViT(**SMALL, num_classes=10, global_pool="avg", qkv_bias=False)
    keys = set(vit.state_dict())
    assert keys == set(ViT(**SMALL, num_classes=10, global_pool="avg").state_dict()) - {
        f"blocks.{i}.attn.qkv.bias" for i in range(2)
    }
    VisionTransformer(**SMALL, num_classes=10, qkv_bias=False, global_pool="avg").load_state_dict(vit.state_dict())
    with torch.no_grad():
        assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_norm_eps_and_qkv_bias_reach_every_layer_of_the_mae():
    mae = small_mae(norm_eps=1e-12, qkv_bias=False)
    norms = [m for m in mae.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 + 2 * 2 + 1 and all(m.eps == 1e-12 for m in norms)  # blocks, norm, decoder's
    assert not any(k.endswith("qkv.bias") for k in mae.state_dict())
    with torch.no_grad():
        assert torch.isfinite(mae(torch.randn(2, 3, 16, 16)).loss)


def test_mae_encoder_weights_load_into_a_vit():
    mae = small_mae()
    vit = ViT(**SMALL, num_classes=10, global_pool="cls")
    result = vit.load_state_dict(mae.state_dict(), strict=False)
    assert set(result.missing_keys) == wb("head")
    assert set(result.unexpected_keys) == (
        {"mask_token", "decoder_pos_embed"}
        | wb("decoder_embed", "decoder_norm", "decoder_pred")
        | block_keys("decoder_blocks", 2)
    )


# ---------------------------------------------------------------- what the encoder and decoder see


def first_block_inputs(model: MaskedAutoencoder, x: torch.Tensor, **kw):
    seen = {}
    hooks = [
        model.blocks[0].register_forward_hook(lambda m, args, out: seen.__setitem__("enc", args[0])),
        model.decoder_blocks[0].register_forward_hook(lambda m, args, out: seen.__setitem__("dec", args[0])),
    ]
    try:
        out = model(x, **kw)
    finally:
        for h in hooks:
            h.remove()
    return out, seen["enc"], seen["dec"]


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_encoder_sees_only_visible_patches(ratio):
    model = small_mae()
    x = torch.randn(2, 3, 16, 16)
    out, enc, dec = first_block_inputs(model, x, mask_ratio=ratio)
    K = int(L * (1 - ratio))
    assert enc.shape == (2, 1 + K, 32)
    assert dec.shape == (2, 1 + L, 24)
    assert torch.equal(out.mask.sum(1), torch.full((2,), float(L - K)))


def test_encoder_ignores_the_pixels_of_removed_patches():
    model = small_mae().eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, L)
    latent, mask, _ = model.forward_encoder(x, 0.75, noise)
    # overwrite every removed patch with other pixels: the encoder output must not move
    pix_mask = mask.view(2, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).bool()
    y = torch.where(pix_mask, torch.randn_like(x) * 10, x)
    latent2, mask2, _ = model.forward_encoder(y, 0.75, noise)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent, latent2, atol=1e-6, rtol=0)
    # ...and a visible patch does change it
    z = x.clone()
    z[~pix_mask.expand_as(x)] += 1.0
    assert not torch.allclose(model.forward_encoder(z, 0.75, noise)[0], latent, atol=1e-3)


def test_decoder_input_puts_tokens_back_in_patch_order():
    """Decoder input at patch l: decoder_embed(its encoded token) if visible, the mask token if removed, plus
    the decoder position of l."""
    model = small_mae().eval()
    torch.manual_seed(2)
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, L)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(x, 0.75, noise)
        _, _, dec = first_block_inputs(model, x, noise=noise)
        emb = model.decoder_embed(latent)  # (B, 1 + K, E)
    pos = model.decoder_pos_embed[0]  # (1 + L, E)
    keep_order = torch.argsort(noise, 1)  # kept tokens arrive in increasing noise order
    torch.testing.assert_close(dec[:, 0], emb[:, 0] + pos[0])
    for b in range(2):
        for patch in range(L):
            if mask[b, patch] == 1:
                expected = model.mask_token[0, 0] + pos[1 + patch]
            else:
                rank = (keep_order[b] == patch).nonzero().item()
                expected = emb[b, 1 + rank] + pos[1 + patch]
            torch.testing.assert_close(dec[b, 1 + patch], expected, atol=1e-6, rtol=0)


def test_prediction_of_each_patch_comes_from_its_own_decoder_token():
    """With no decoder blocks (no mixing across tokens) each prediction can be written down: the decoder
    head applied to the mask token (removed patch) or to the patch's encoded token (visible), plus its position."""
    model = small_mae(decoder_depth=0).eval()
    torch.manual_seed(6)
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, L)
    with torch.no_grad():
        out = model(x, noise=noise)
        latent, mask, _ = model.forward_encoder(x, 0.75, noise)
        emb = model.decoder_embed(latent)
        pos = model.decoder_pos_embed[0]
        keep_order = torch.argsort(noise, 1)
        for b in range(2):
            for patch in range(L):
                if mask[b, patch] == 1:
                    token = model.mask_token[0, 0]
                else:
                    token = emb[b, 1 + (keep_order[b] == patch).nonzero().item()]
                expected = model.decoder_pred(model.decoder_norm(token + pos[1 + patch]))
                torch.testing.assert_close(out.pred[b, patch], expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- position embeddings


def test_sincos_pos_embed_is_frozen_and_exact():
    model = small_mae()
    for name, width in (("pos_embed", 32), ("decoder_pos_embed", 24)):
        p = getattr(model, name)
        assert not p.requires_grad
        assert torch.equal(p.data[0], sincos_pos_embed(width, 4))
    vit = ViT(**SMALL, num_classes=10)
    assert not vit.pos_embed.requires_grad
    assert torch.equal(vit.pos_embed.data[0], sincos_pos_embed(32, 4))


def test_learned_pos_embed_is_trainable():
    model = small_mae(pos_embed="learned")
    assert model.pos_embed.requires_grad and model.decoder_pos_embed.requires_grad
    assert not torch.equal(model.pos_embed.data[0], sincos_pos_embed(32, 4))
    assert 0 < model.pos_embed.std().item() < 0.05  # trunc_normal(std=0.02)
    model(torch.randn(2, 3, 16, 16)).loss.backward()
    assert model.pos_embed.grad.abs().sum() > 0 and model.decoder_pos_embed.grad.abs().sum() > 0


def test_unknown_pos_embed_is_rejected():
    with pytest.raises(ValueError, match="pos_embed"):
        small_mae(pos_embed="rope")


# ---------------------------------------------------------------- forward and loss


def test_same_noise_same_loss_and_mask():
    model = small_mae()
    torch.manual_seed(3)
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, L)
    a, b = model(x, noise=noise), model(x, noise=noise.clone())
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.pred, b.pred)
    c = model(x, noise=torch.rand(2, L))
    assert not torch.equal(a.mask, c.mask)
    assert a.loss.item() != c.loss.item()


def test_mask_ratio_default_and_override():
    model = small_mae(mask_ratio=0.75)
    x = torch.randn(3, 3, 16, 16)
    assert model(x).mask.sum(1).tolist() == [12.0] * 3
    assert model(x, mask_ratio=0.5).mask.sum(1).tolist() == [8.0] * 3
    assert model(x, mask_ratio=0.25).mask.sum(1).tolist() == [4.0] * 3


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_is_masked_mse_of_pred_and_target(norm_pix):
    model = small_mae(norm_pix_loss=norm_pix)
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.pred.shape == (2, L, 4 * 4 * 3) and out.mask.shape == (2, L)
    assert out.loss.shape == ()
    torch.testing.assert_close(out.loss, masked_mse(out.pred, model.target(x), out.mask))
    # and by hand: mean over removed patches of the per-patch mean squared error
    per_patch = ((out.pred - model.target(x)) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, per_patch[out.mask.bool()].mean())


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_block_at_rows_is_the_block_at_those_rows(attention, qkv_bias):
    model = small_mae(qkv_bias=qkv_bias)
    set_attention(model, attention)
    block = model.decoder_blocks[0]
    torch.manual_seed(6)
    x, rows = torch.randn(3, 1 + L, 24), torch.stack([torch.randperm(1 + L)[:5] for _ in range(3)])
    want = torch.gather(block(x), 1, rows.unsqueeze(-1).expand(-1, -1, 24))
    torch.testing.assert_close(block_at(block, x, rows), want)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_path_has_the_same_loss_and_gradients(norm_pix, checkpointing):
    """pred_visible=False (what training calls) skips the visible patches in the last decoder block."""
    torch.manual_seed(7)
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, L)
    runs = []
    for pred_visible in (True, False):
        model = small_mae(norm_pix_loss=norm_pix)
        model.set_grad_checkpointing(checkpointing)
        out = model(x, noise=noise, pred_visible=pred_visible)
        out.loss.backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (full, grads), (short, short_grads) = runs
    torch.testing.assert_close(short.loss, full.loss)
    assert torch.equal(short.mask, full.mask)
    removed = full.mask.bool()
    torch.testing.assert_close(short.pred[removed], full.pred[removed])
    assert not short.pred[~removed].any()  # visible patches were not predicted
    assert grads.keys() == short_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(short_grads[name], g, msg=name)


def test_norm_pix_loss_changes_the_target():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16) * 2 + 3
    plain, normed = small_mae(norm_pix_loss=False), small_mae(norm_pix_loss=True)
    assert torch.equal(plain.target(x), patchify(x, 4))
    t = normed.target(x)
    assert t.shape == (2, L, 48)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, L), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, L), atol=1e-4, rtol=0)
    assert not torch.allclose(t, plain.target(x))


# ---------------------------------------------------------------- every preset, tiny


def tiny(name: str):
    m = resolve("pretrain", name).model
    img = m.img_size if m.img_size <= 64 else 4 * m.patch_size
    return dataclasses.replace(
        m,
        img_size=img,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )


def assert_all_trainable_got_gradients(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", preset_names())
def test_preset_forward_backward_at_tiny_width(name):
    m = tiny(name)
    torch.manual_seed(0)
    x = torch.randn(2, m.in_chans, m.img_size, m.img_size)
    L_preset = (m.img_size // m.patch_size) ** 2

    mae = build_mae(m)
    assert mae.patch_size == m.patch_size and mae.mask_ratio == m.mask_ratio
    assert mae.norm_pix_loss == m.norm_pix_loss
    assert mae.pos_embed.requires_grad == (m.pos_embed == "learned")
    out = mae(x)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.pred.shape == (2, L_preset, m.patch_size**2 * m.in_chans)
    assert out.mask.sum(1).tolist() == [float(L_preset - int(L_preset * (1 - m.mask_ratio)))] * 2
    out.loss.backward()
    assert_all_trainable_got_gradients(mae)

    vit = build_vit(m, 10)
    assert vit.global_pool == m.global_pool
    for model in (mae, vit):  # the config's fields reach the model
        assert model.pos_embed.requires_grad == (m.pos_embed == "learned")
        assert model.patch_embed.proj.kernel_size == (m.patch_size, m.patch_size)
        assert model.patch_embed.proj.in_channels == m.in_chans
        assert len(model.blocks) == m.depth and model.blocks[0].attn.num_heads == m.num_heads
        assert model.blocks[0].mlp.fc1.out_features == int(m.embed_dim * m.mlp_ratio)
    logits = vit(x)
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    assert_all_trainable_got_gradients(vit)


# ---------------------------------------------------------------- optimizer groups and schedule


@pytest.mark.parametrize("pos", ["sincos", "learned"])
def test_param_groups(pos):
    model = small_mae(pos_embed=pos)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    params = dict(model.named_parameters())
    decay_names = {n for n, p in params.items() if any(p is q for q in decay["params"])}
    no_decay_names = {n for n, p in params.items() if any(p is q for q in no_decay["params"])}
    assert len(decay["params"]) == len(decay_names) and len(no_decay["params"]) == len(no_decay_names)
    assert not decay_names & no_decay_names

    expected_decay = {n for n in params if n.endswith((".weight", "_token")) and params[n].ndim >= 2}
    assert expected_decay >= {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"}
    assert decay_names == expected_decay
    positions = {"pos_embed", "decoder_pos_embed"}
    assert {"cls_token", "mask_token"} <= decay_names  # as the official pretraining
    expected_no_decay = {n for n in params if n.endswith(".bias")}
    expected_no_decay |= {n for n in params if "norm" in n and n.endswith(".weight")}
    if pos == "learned":
        expected_no_decay |= positions
    assert no_decay_names == expected_no_decay
    assert {"norm.weight", "blocks.1.norm2.weight", "decoder_norm.weight"} <= no_decay_names
    assert decay_names | no_decay_names == {n for n, p in params.items() if p.requires_grad}
    if pos == "sincos":
        assert not positions & (decay_names | no_decay_names)  # frozen: left out of the optimizer


def test_param_groups_of_a_classifier():
    vit = ViT(**SMALL, num_classes=10, global_pool="avg", pos_embed="learned")
    decay, no_decay = param_groups(vit, 0.1)
    ids = {id(p) for p in no_decay["params"]}
    assert id(vit.cls_token) in ids and id(vit.pos_embed) in ids and id(vit.fc_norm.weight) in ids
    assert id(vit.head.bias) in ids
    assert {id(p) for p in decay["params"]} == {id(p) for n, p in vit.named_parameters() if p.ndim >= 2} - ids


def test_training_optimizer_is_fused_adamw_with_the_configs_settings():
    tc = resolve("pretrain", "smoke").train
    model = small_mae()
    opt = adamw(model, tc, torch.device("cpu"))
    assert opt.defaults["fused"] and opt.defaults["lr"] == tc.peak_lr and opt.defaults["betas"] == tc.betas
    assert [g["weight_decay"] for g in opt.param_groups] == [tc.weight_decay, 0.0]
    # the fused kernel takes the same steps as PyTorch's default (foreach) AdamW
    twin = small_mae()
    plain = torch.optim.AdamW(param_groups(twin, tc.weight_decay), lr=tc.peak_lr, betas=tc.betas)
    imgs = torch.randn(2, 3, 16, 16)
    for _ in range(3):
        noise = torch.rand(2, L)
        for m, o in ((model, opt), (twin, plain)):
            m(imgs, noise=noise).loss.backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        if not name.endswith("qkv.bias"):  # keys' biases get a zero gradient, so Adam's step there is rounding
            torch.testing.assert_close(a, b, msg=name)


def test_lr_at_schedule():
    total, warmup, peak, low = 100, 10, 1e-3, 1e-5
    lrs = [lr_at(s, total, warmup, peak, low) for s in range(total + 1)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(peak / 2)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1], strict=True))  # linear warmup
    assert lrs[warmup] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    assert lrs[total] == pytest.approx(low)
    assert all(a > b for a, b in zip(lrs[warmup:-1], lrs[warmup + 1 :], strict=True))  # cosine decay
    # half way through the decay: the middle of the cosine
    assert lr_at(55, total, warmup, peak, low) == pytest.approx(low + (peak - low) / 2)
    assert lr_at(total + 50, total, warmup, peak, low) == pytest.approx(low)  # clamped after the end
    assert lr_at(0, total, 0, peak, low) == pytest.approx(peak)  # no warmup
    assert all(math.isfinite(v) for v in lrs)
