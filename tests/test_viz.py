"""Pictures: reconstruction grids (and norm_pix de-normalization), curves.png, `mae reconstruct`, `mae compare`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mae_torch.cli import main
from mae_torch.mae import MaskedAutoencoder
from mae_torch.ops import norm_patches, patchify
from mae_torch.viz import caption, denormalize_patches, reconstruction_grid

CPU = ["--preset", "smoke", "--num-workers", "0", "--device", "cpu", "--epochs", "1"]


def mae(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A smoke pretraining run (norm_pix_loss) and a fine-tuning run on 2 classes of tiny images."""
    root = tmp_path_factory.mktemp("viz")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "data" / f"c{c}").mkdir(parents=True)
        for i in range(24):
            img = (rng.random((20, 20, 3)) * 255).astype(np.uint8)  # 20x20: resized to the model's 16x16
            Image.fromarray(img).save(root / "data" / f"c{c}" / f"{i}.png")
    assert mae("pretrain", *CPU, "--data", root / "data", "--norm-pix-loss", "--out", root / "pre") == 0
    assert mae("finetune", *CPU, "--data", root / "data", "--out", root / "ft") == 0
    return root


def tiny_mae(**kw) -> MaskedAutoencoder:
    return MaskedAutoencoder(16, 4, 3, 32, 1, 2, 2.0, "sincos", 32, 1, 2, **kw)


def test_denormalize_undoes_norm_pix_when_patches_share_statistics():
    # Every patch of these images has the same mean and variance, so the visible patches' statistics are
    # exactly those of the removed ones and de-normalization must give back the pixels.
    torch.manual_seed(0)
    tile = torch.randn(2, 3, 4, 4)
    imgs = tile.repeat(1, 1, 4, 4)  # (2, 3, 16, 16): the same 4x4 patch everywhere
    target = patchify(imgs, 4)
    mask = (torch.rand(2, 16) < 0.75).float()
    torch.testing.assert_close(denormalize_patches(norm_patches(target), imgs, mask, 4), target, atol=1e-4, rtol=0)


def test_reconstruction_grid_shows_visible_patches_unchanged():
    torch.manual_seed(0)
    model = tiny_mae()
    imgs = torch.rand(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    grid = reconstruction_grid(model, imgs, noise, mean=(0, 0, 0), std=(1, 1, 1))
    scale = 6  # 16 px upscaled to at least 96
    assert grid.shape == (3, 2 * (16 * scale + 2) + 2, 3 * (16 * scale + 2) + 2)
    # first row: masked | reconstruction | original; visible patches equal in all three
    tile = 16 * scale + 2
    row = [grid[:, 2 : 2 + 16 * scale, 2 + k * tile : 2 + k * tile + 16 * scale] for k in range(3)]
    mask = model(imgs, noise=noise).mask[0].view(4, 4).repeat_interleave(4 * scale, 0).repeat_interleave(4 * scale, 1)
    visible = mask == 0
    assert torch.allclose(row[1][:, visible], row[2][:, visible])
    assert torch.allclose(row[0][:, ~visible], torch.full_like(row[0][:, ~visible], 0.5))  # removed: grey


def test_caption_explains_norm_pix():
    assert "visible patches" in caption(tiny_mae(norm_pix_loss=True))
    assert "norm_pix" not in caption(tiny_mae())


def test_run_directory_has_labelled_pictures(runs):
    for run in ("pre", "ft"):
        with Image.open(runs / run / "curves.png") as im:
            assert im.width > 300 and im.height > 200
    with Image.open(runs / "pre" / "reconstructions.png") as im:
        assert im.width >= 3 * 96


def test_reconstruct_and_compare(runs, capsys):
    out = runs / "grid.png"
    assert (
        mae(
            "reconstruct",
            "--checkpoint",
            runs / "pre",
            "--images",
            runs / "data" / "c0",
            "--out",
            out,
            "--mask-ratio",
            "0.5",
            "--seed",
            "3",
        )
        == 0
    )
    with Image.open(out) as im:
        assert im.height > 16 * 96  # 16 images, one row each
    assert mae("compare", runs / "pre", runs / "ft", "--out", runs / "cmp.png") == 0
    assert (runs / "cmp.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["reconstruct", "--checkpoint", "{ft}", "--images", "{data}"], "needs the full MAE weights"),
        (["reconstruct", "--checkpoint", "{pre}", "--images", "{data}", "--mask-ratio", "1"], "--mask-ratio"),
        (["reconstruct", "--checkpoint", "{pre}", "--images", "{data}/missing.png"], "image path not found"),
        (["compare", "{data}", "--out", "{data}/x.png"], "no metrics.jsonl"),
    ],
)
def test_picture_commands_refuse_bad_input(runs, capsys, args, expected):
    paths = {"ft": runs / "ft", "pre": runs / "pre", "data": runs / "data"}
    assert mae(*[a.format(**paths) for a in args], *([] if args[0] == "compare" else ["--out", runs / "o.png"])) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


def test_embed_writes_the_encoders_features_and_labels(runs, capsys):
    import json

    from mae_torch.data import build_datasets
    from mae_torch.models import build_vit, load_weights, model_config_from
    from mae_torch.runtime import Normalizer

    out = runs / "feats.npy"
    assert (
        mae(
            "embed",
            "--checkpoint",
            runs / "ft",
            "--data",
            runs / "data",
            "--out",
            out,
            "--pool",
            "avg",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["n"] == 48
    feats, labels = np.load(out), np.load(runs / "feats.labels.npy")
    assert feats.shape == (48, 32) and list(labels) == [0] * 24 + [1] * 24
    state, meta = load_weights(runs / "ft")
    m = model_config_from(meta)
    vit = build_vit(m, 2)
    vit.load_state_dict(state)
    ds, _, _ = build_datasets(str(runs / "data"), data_root=None, img_size=16, val_fraction=0.0)
    x = Normalizer(m.mean, m.std, torch.device("cpu"))(torch.stack([ds[i][0] for i in (0, 47)]))
    with torch.no_grad():
        expected = vit.eval().encode(x, "avg")
    np.testing.assert_allclose(feats[[0, 47]], expected.numpy(), atol=2e-2)  # bf16 autocast in embed
