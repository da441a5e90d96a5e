"""Fine-tuning recipe options: layer-wise lr decay, mixup/cutmix, RandAugment, random erasing, EMA, flip TTA,
and the class-balanced label subsets of low-label fine-tuning."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mae_torch.augment import RA_GROUP, Augment
from mae_torch.cli import main
from mae_torch.config import IMAGENET_MEAN, IMAGENET_STD, resolve
from mae_torch.data import TensorImages, label_subset
from mae_torch.optim import param_groups
from mae_torch.runtime import Normalizer
from mae_torch.tasks import classification_sums
from mae_torch.vit import ViT


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes") / "data"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(36):
            img = (rng.random((16, 16, 3)) * 100).astype(np.uint8)
            img[..., 2 * c] += 150
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


def test_layer_decay_scales_the_lr_by_depth():
    vit = ViT(16, 4, 3, 32, 2, 2, num_classes=3)
    groups = param_groups(vit, 0.05, layer_decay=0.5)
    scale = {}
    for g in groups:
        for p in g["params"]:
            scale[next(n for n, q in vit.named_parameters() if q is p)] = (g["lr_scale"], g["weight_decay"])
    assert scale["cls_token"] == (0.125, 0.0) and scale["patch_embed.proj.weight"] == (0.125, 0.05)
    assert scale["blocks.0.attn.qkv.weight"] == (0.25, 0.05) and scale["blocks.1.mlp.fc1.bias"] == (0.5, 0.0)
    assert scale["head.weight"] == (1.0, 0.05) and "pos_embed" not in scale  # sin-cos: frozen


def test_flip_tta_averages_the_logits_of_both_views():
    torch.manual_seed(0)
    vit = ViT(16, 4, 3, 32, 1, 2, num_classes=3).eval()
    torch.nn.init.normal_(vit.head.weight)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        logits = (vit(x) + vit(x.flip(-1))) / 2
        sums = classification_sums(vit, x, y, tta_flip=True)
    expected = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    assert torch.allclose(sums["loss"], expected) and sums["acc"] == (logits.argmax(-1) == y).sum()


def test_augment_pipeline_keeps_shapes_and_changes_images():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    norm = Normalizer((0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    plain = Augment()(images, norm)
    assert torch.equal(plain, norm(images))  # everything off: just normalization
    out = Augment((0.5, 1.0), True, randaugment=2, reprob=1.0)(images, norm)
    assert out.shape == plain.shape and out.dtype == torch.float32 and not torch.allclose(out, plain)


def test_randaugment_draws_ops_per_group_of_images():
    torch.manual_seed(0)
    one = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    images = one.expand(8 * RA_GROUP, -1, -1, -1).contiguous()  # the same image everywhere
    norm = Normalizer((0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    groups = Augment(randaugment=2)(images, norm).split(RA_GROUP)
    assert all(torch.equal(g, g[:1].expand_as(g)) for g in groups)  # one draw per group...
    assert len({g[0].numpy().tobytes() for g in groups}) > 1  # ...and new draws for other groups


def test_label_subsets_are_balanced_seeded_and_nested_in_the_data():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    ds = TensorImages(torch.zeros(100, 3, 2, 2, dtype=torch.uint8), labels)
    sub = label_subset(ds, fraction=0.1, seed=0)
    assert Counter(int(v) for v in sub.labels) == {0: 5, 1: 3, 2: 2}
    assert sub.indices == label_subset(ds, fraction=0.1, seed=0).indices != label_subset(ds, 0.1, seed=1).indices
    assert Counter(int(v) for v in label_subset(ds, per_class=25).labels) == {0: 25, 1: 25, 2: 20}
    assert label_subset(ds) is ds


def test_full_recipe_fine_tunes_with_ema(data, tmp_path):
    run = tmp_path / "run"
    args = [
        "finetune",
        "--preset",
        "smoke",
        "--data",
        data,
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--epochs",
        "2",
        "--mixup",
        "0.8",
        "--cutmix",
        "1.0",
        "--randaugment",
        "2",
        "--reprob",
        "0.25",
        "--layer-decay",
        "0.75",
        "--label-smoothing",
        "0.1",
        "--drop-path",
        "0.1",
        "--crop-scale",
        "0.5",
        "1",
        "--hflip",
        "--ema-decay",
        "0.9",
        "--tta-flip",
        "--label-fraction",
        "0.5",
        "--out",
        run,
    ]
    assert main([str(a) for a in args]) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    saved = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in ckpt["ema"].items())  # the EMA is what gets shared
    assert any(not torch.equal(saved[k], v) for k, v in ckpt["model"].items() if v.is_floating_point())


def test_knn_vote_is_weighted_by_similarity():
    from mae_torch.features import knn_accuracy

    memory = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    queries = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    assert knn_accuracy(memory, labels, queries, torch.tensor([0, 1]), k=3) == 1.0
    assert knn_accuracy(memory, labels, queries, torch.tensor([1, 0]), k=3) == 0.0
    # k=3, one neighbour of class 1 but far more similar than two of class 0: the weighted vote picks it
    assert knn_accuracy(memory, labels, torch.tensor([[0.2, 1.0]]), torch.tensor([1]), k=3, temperature=0.05) == 1.0


def test_pretraining_logs_knn_and_probes_run(data, tmp_path, capsys):
    import json

    run = tmp_path / "pre"
    args = [
        "pretrain",
        "--preset",
        "smoke",
        "--data",
        data,
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--epochs",
        "2",
        "--knn-every",
        "1",
        "--out",
        run,
    ]
    assert main([str(a) for a in args]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["knn_acc"] <= 1 for m in lines)
    capsys.readouterr()
    common = ["--checkpoint", run, "--data", data, "--device", "cpu", "--num-workers", "0"]
    assert main([str(a) for a in ["knn", *common]]) == 0
    knn = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert knn["knn_top1"] == pytest.approx(lines[-1]["knn_acc"]) and knn["n"] == 8
    assert (
        main([str(a) for a in ["linprobe", *common, "--epochs", "30", "--batch-size", "32", "--optimizer", "sgd"]]) == 0
    )
    probe = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert probe["best_top1"] >= 0.75  # two colour classes: linearly separable even in a barely trained encoder
    augmented = ["linprobe", *common, "--epochs", "30", "--batch-size", "32", "--blr", "20", "--augment"]
    assert main([str(a) for a in augmented]) == 0  # LARS, a fresh crop + flip of every image each epoch
    probe = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert probe["best_top1"] >= 0.75  # colour survives crops and flips


# The published recipes, value by value: He et al. 2021, Appendix A.1 (Table 8: pretraining) and A.2 (Table 9:
# end-to-end fine-tuning), and the official repository's PRETRAIN.md / FINETUNE.md (per-model epochs, blr,
# layer decay, drop path). Written out here, apart from the preset files, so that a preset edited away from
# the paper fails.
PAPER_PRETRAIN = dict(
    epochs=800,  # PRETRAIN.md (the paper's longest schedule is 1600)
    batch_size=4096,
    blr=1.5e-4,
    min_lr=0.0,
    weight_decay=0.05,
    betas=(0.9, 0.95),
    warmup_epochs=40,
    crop_scale=(0.2, 1.0),
    hflip=True,
    randaugment=0,
    mixup=0.0,
    cutmix=0.0,
    reprob=0.0,
    label_smoothing=0.0,
    layer_decay=1.0,
)
PAPER_FINETUNE = dict(
    batch_size=1024,
    min_lr=1e-6,
    weight_decay=0.05,
    betas=(0.9, 0.999),
    warmup_epochs=5,
    crop_scale=(0.08, 1.0),
    hflip=True,
    randaugment=2,
    reprob=0.25,
    mixup=0.8,
    cutmix=1.0,
    label_smoothing=0.1,
)
PAPER_MODELS = {  # width, depth, heads, patch; fine-tuning epochs, blr, layer decay, drop path
    "imagenet-vit-base": (768, 12, 12, 16, 100, 5e-4, 0.65, 0.1),
    "imagenet-vit-large": (1024, 24, 16, 16, 50, 1e-3, 0.75, 0.2),
    "imagenet-vit-huge": (1280, 32, 16, 14, 50, 1e-3, 0.75, 0.3),
}


@pytest.mark.parametrize("preset", sorted(PAPER_MODELS))
def test_imagenet_presets_are_the_published_recipes(preset):
    width, depth, heads, patch, ft_epochs, ft_blr, layer_decay, drop_path = PAPER_MODELS[preset]
    pre, ft = resolve("pretrain", preset), resolve("finetune", preset)
    m = pre.model
    assert (m.img_size, m.embed_dim, m.depth, m.num_heads, m.patch_size) == (224, width, depth, heads, patch)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    assert (m.mask_ratio, m.norm_pix_loss, m.pos_embed, m.global_pool) == (0.75, True, "sincos", "avg")
    assert m.drop_path == drop_path and tuple(m.mean) == IMAGENET_MEAN and tuple(m.std) == IMAGENET_STD
    for train, expected in [(pre.train, PAPER_PRETRAIN), (ft.train, PAPER_FINETUNE)]:
        assert {k: getattr(train, k) for k in expected} == expected, preset
    assert (ft.train.epochs, ft.train.blr, ft.train.layer_decay) == (ft_epochs, ft_blr, layer_decay)
    assert pre.train.peak_lr == pytest.approx(2.4e-3) and ft.train.peak_lr == pytest.approx(ft_blr * 4)
    assert pre.run.data == ft.run.data == ""  # no CIFAR default under an ImageNet model
    assert not pre.run.in_memory and not ft.run.in_memory  # the official pipeline: crops of the original files


def test_an_imagenet_preset_without_data_is_a_one_line_error(tmp_path, capsys):
    assert main(["pretrain", "--preset", "imagenet-vit-base", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --data PATH" in err
