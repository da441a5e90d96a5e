"""The streaming path: decoding and augmentation in DataLoader workers from the original image, no squashed
images anywhere, unreadable files found where they are read (stop with the name, or skip and count)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mae_torch.cli import main
from mae_torch.config import resolve
from mae_torch.data import ImageFiles
from mae_torch.data.stream import train_transform
from mae_torch.engine import Trainer


@pytest.fixture
def wide(tmp_path):
    """Two classes of 48x24 images (wider than tall), 12 each."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(12):
            img = (rng.random((24, 48, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "data" / c / f"{i:02d}.png")
    return tmp_path / "data"


def stripes(path) -> str:
    """32x16: red outer quarters, a blue middle half."""
    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :8, 0] = img[:, 24:, 0] = 255
    img[:, 8:24, 2] = 255
    Image.fromarray(img).save(path)
    return str(path)


def test_images_keep_their_aspect_ratio(tmp_path):
    x, _ = ImageFiles([stripes(tmp_path / "s.png")], None, img_size=16)[0]
    assert x.shape == (3, 16, 16) and int(x[0].max()) == 0 and int(x[2].min()) == 255  # the centre, not squashed
    x, _ = ImageFiles([stripes(tmp_path / "s.png")], None, img_size=14, crop_pct=0.875)[0]  # shorter side to 16
    assert x.shape == (3, 14, 14) and int(x[0].max()) == 0


def test_training_transform_crops_the_original_image(tmp_path):
    cfg = resolve("finetune", "cifar10-vit-tiny-improved")
    t = train_transform(cfg.model, cfg.train)
    x = torch.from_numpy(np.asarray(Image.open(stripes(tmp_path / "s.png")).convert("RGB"))).permute(2, 0, 1)
    outs = [t(x) for _ in range(20)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outs)
    assert any(o[0].max() > 200 for o in outs)  # the red sides, outside the centre square, get sampled


@pytest.mark.parametrize("size", [(500, 375), (37, 61)])
def test_training_transform_is_the_official_pil_one_to_within_rounding(size):
    """Same seed, same crop and flip as the official code's PIL transform; the bicubic resize's pixels within 2."""
    import torchvision.transforms as T1

    cfg = resolve("pretrain", "imagenet-vit-base")
    rng = np.random.default_rng(0)
    w, h = size
    smooth = np.kron(rng.random((h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
    img = ((smooth * 0.8 + rng.random((h, w, 3)) * 0.2) * 255).astype(np.uint8)  # coarse colour + fine noise
    official = T1.Compose([T1.RandomResizedCrop(224, (0.2, 1.0), interpolation=T1.InterpolationMode.BICUBIC),
                           T1.RandomHorizontalFlip()])  # fmt: skip
    ours = train_transform(cfg.model, cfg.train)
    x = torch.from_numpy(img).permute(2, 0, 1)  # as torchvision's decoder gives it: channels-last strides
    for seed in range(8):
        torch.manual_seed(seed)
        ref = torch.from_numpy(np.asarray(official(Image.fromarray(img)))).permute(2, 0, 1).int()
        torch.manual_seed(seed)
        diff = (ours(x).int() - ref).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.2, (seed, diff.max(), diff.float().mean())


def test_torchvision_and_pil_decode_the_same_pixels(tmp_path):
    """The streaming path decodes with torchvision where it can, PIL elsewhere: the same image either way."""
    rng = np.random.default_rng(1)
    img = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    paths = []
    for fmt, mode in [("jpg", "RGB"), ("png", "RGB"), ("png", "P"), ("bmp", "RGB"), ("webp", "RGB")]:
        paths.append(str(tmp_path / f"{len(paths)}.{fmt}"))
        Image.fromarray(img).convert(mode).save(paths[-1])
    wide = (rng.random((40, 56)) * 65535).astype(np.uint16)
    paths.append(str(tmp_path / "16bit.png"))
    Image.fromarray(wide).save(paths[-1])
    files = ImageFiles(paths, None, img_size=8)
    for j in range(len(paths)):
        ref = torch.from_numpy(np.asarray(files.convert(files.open(j)))).permute(2, 0, 1)
        assert torch.equal(files.decode_tensor(j), ref), paths[j]


def run(args, tmp_path, name):
    common = ["--preset", "smoke", "--device", "cpu", "--precision", "fp32", "--no-in-memory", "--out"]
    return main([str(a) for a in [*args, *common, tmp_path / name]])


def test_streaming_pretraining_and_fine_tuning(wide, tmp_path):
    aug = ["--crop-scale", "0.2", "1", "--hflip", "--num-workers", "2"]
    assert run(["pretrain", "--data", wide, *aug, "--epochs", "2"], tmp_path, "pre") == 0
    ft = ["finetune", "--data", wide, *aug, "--randaugment", "2", "--reprob", "0.25", "--mixup", "0.8"]
    assert run([*ft, "--pretrained", tmp_path / "pre", "--epochs", "1"], tmp_path, "ft") == 0
    lines = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and 0 <= lines[0]["val_acc"] <= 1


def test_augmentation_is_the_same_with_any_workers_and_after_a_resume(wide, tmp_path, monkeypatch):
    ft = ["finetune", "--data", wide, "--crop-scale", "0.2", "1", "--hflip", "--randaugment", "2", "--epochs", "2"]
    ft += ["--batch-size", "4", "--save-every", "1"]
    assert run([*ft, "--num-workers", "0"], tmp_path, "whole") == 0
    calls, micro_step = [0], Trainer.micro_step

    def interrupted(self, *a, **kw):  # Ctrl-C in the middle of the second epoch
        calls[0] += 1
        if calls[0] == 7:
            raise KeyboardInterrupt
        return micro_step(self, *a, **kw)

    monkeypatch.setattr(Trainer, "micro_step", interrupted)
    assert run([*ft, "--num-workers", "2"], tmp_path, "cut") != 0
    monkeypatch.setattr(Trainer, "micro_step", micro_step)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6
    assert main(["finetune", "--resume", str(tmp_path / "cut")]) == 0
    whole, resumed = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("whole", "cut"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_file_mid_run_stops_with_its_name_and_keeps_the_checkpoint(wide, tmp_path, capsys, workers):
    args = ["pretrain", "--data", wide, "--num-workers", workers, "--epochs", "1"]
    assert run(args, tmp_path, "pre") == 0
    before = (tmp_path / "pre" / "checkpoint.pt").read_bytes()
    good = (wide / "b" / "05.png").read_bytes()
    (wide / "b" / "05.png").write_bytes(good[: len(good) // 2])  # truncated after the first epoch
    capsys.readouterr()
    resume = ["pretrain", "--resume", tmp_path / "pre", "--epochs", "2"]
    assert main([str(a) for a in resume]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "05.png" in err[0] and "remove or replace it" in err[0]
    assert (tmp_path / "pre" / "checkpoint.pt").read_bytes() == before


def test_skip_bad_images_replaces_and_counts_them(wide, tmp_path, capfd):
    (wide / "a" / "99.png").write_bytes(b"not an image")
    args = ["pretrain", "--data", wide, "--num-workers", "2", "--epochs", "2", "--skip-bad-images"]
    assert run(args, tmp_path, "pre") == 0
    lines = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_images"] >= 1 and math.isfinite(lines[-1]["val_loss"])
    assert "skipped unreadable image" in (err := capfd.readouterr().err) and "99.png" in err  # from a worker


def test_bench_times_the_data_path_beside_the_step(wide, capsys):
    args = ["bench", "--preset", "smoke", "--device", "cpu", "--batch-size", "8", "--steps", "1", "--warmup", "1"]
    assert main([*args, "--data", str(wide), "--num-workers", "0", "--mode", "finetune", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    data = [r for r in rows if r["design"] == "data"]
    assert len(data) == 1 and data[0]["files"] == 24 and data[0]["img_per_s"] > 0
