"""WebDataset-format tar shards: `mae shards` writes them, every command reads them (a folder of shards or a brace
pattern), the webdataset package reads ours and we read its, and bad shards are found and named.

The shards are written by the tests from tiny PNGs (test_cli's colour classes); nothing touches the network.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_cli import write_images

from mae_torch.cli import main
from mae_torch.data import build_datasets, build_eval_dataset
from mae_torch.data.path import SHARD_WINDOW, DataPath, grouping
from mae_torch.data.shards import ShardSamples, expand_braces
from mae_torch.errors import MAEError

CLASSES = ["red", "green", "blue"]
CPU = ["--preset", "smoke", "--device", "cpu", "--precision", "fp32"]


def mae(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", CLASSES, per_class=30)
    write_images(root / "test", CLASSES, per_class=6, seed=1)
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    assert mae("shards", folder, out, "--shard-size", "16") == 0
    return out


def test_brace_patterns_expand_as_written():
    assert expand_braces("d/t-{000..002}.tar") == ["d/t-000.tar", "d/t-001.tar", "d/t-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_mae_shards_writes_every_split_with_labels_and_its_info(shards):
    info = json.loads((shards / "_info.json").read_text())
    assert info["classes"] == sorted(CLASSES)
    train, test = info["splits"]["train"], info["splits"]["test"]
    assert train["num_samples"] == 90 and train["shard_lengths"] == [16] * 5 + [10]
    assert test["num_samples"] == 18 and sorted(os.listdir(shards)) == sorted(
        ["_info.json", *train["filenames"], *test["filenames"]]
    )
    with tarfile.open(shards / "train-000000.tar") as tar:
        names = tar.getnames()
        labels = [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    assert len(names) == 32 and {n.rsplit(".", 1)[1] for n in names} == {"png", "cls"}
    assert len(set(labels)) == 3  # written in a seeded random order: a shard mixes the classes


def test_shards_read_as_the_folder_they_came_from(folder, shards):
    kw = dict(data_root=None, img_size=16, val_fraction=0.0)
    by_folder = build_eval_dataset(str(folder / "train"), data_root=None, img_size=16)[0]
    by_shards, _, classes = build_datasets(str(shards), **kw)
    assert classes == sorted(CLASSES) and len(by_shards) == len(by_folder) == 90
    images = {}
    for i in range(len(by_folder)):  # the same pixels and labels, in another order
        x, y = by_folder[i]
        images[x.numpy().tobytes()] = y
    assert all(images[x.numpy().tobytes()] == y for x, y in (by_shards[i] for i in range(90)))
    test, test_classes = build_eval_dataset(str(shards), data_root=None, img_size=16)
    assert len(test) == 18 and test_classes == classes
    pattern = build_datasets(str(shards / "train-{000000..000005}.tar"), **kw)[0]
    assert len(pattern) == 90


def test_an_epoch_reads_shards_by_windows_and_sees_each_sample_once(shards):
    cfg_train, _, _ = build_datasets(str(shards), data_root=None, img_size=16, val_fraction=0.1)
    groups = grouping(cfg_train)
    assert groups is not None and len(groups) == len(cfg_train)
    from mae_torch.config import resolve

    cfg = resolve("pretrain", "smoke")
    path = DataPath(cfg_train, cfg_train, cfg.model, cfg.train, torch.device("cpu"), 0, mem=False)
    order = path.epoch_order(len(cfg_train), torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(len(cfg_train)))  # a permutation
    windows = groups[order] // SHARD_WINDOW  # shards 0-5 fit one window at this size...
    assert len(set(windows.tolist())) == 1
    again = path.epoch_order(len(cfg_train), torch.Generator().manual_seed(0))
    assert torch.equal(order, again)  # ...and the order is the seed's


def test_training_on_shards_streams_and_resumes_exactly(shards, tmp_path):
    common = [*CPU, "--data", shards, "--no-in-memory", "--num-workers", "2", "--batch-size", "8"]
    assert mae("pretrain", *common, "--epochs", "2", "--out", tmp_path / "whole") == 0
    assert mae("pretrain", *common, "--epochs", "1", "--out", tmp_path / "cut") == 0
    assert mae("pretrain", "--resume", tmp_path / "cut", "--epochs", "2") == 0
    whole, resumed = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("whole", "cut"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    ft = [*CPU, "--data", shards, "--num-workers", "0", "--epochs", "1", "--pretrained", tmp_path / "whole"]
    assert mae("finetune", *ft, "--out", tmp_path / "ft") == 0  # held in memory: a small set
    assert mae("evaluate", "--checkpoint", tmp_path / "ft", "--data", shards, "--device", "cpu", "--json") == 0


def test_the_webdataset_package_reads_ours_and_we_read_its(shards, tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset(str(shards / "train-000000.tar"), shardshuffle=False).decode("pil"))
    assert len(samples) == 16 and all(s["png"].size == (16, 16) and 0 <= int(s["cls"]) < 3 for s in samples)
    (tmp_path / "theirs").mkdir()
    with wds.ShardWriter(str(tmp_path / "theirs" / "part-%04d.tar"), maxcount=10) as sink:
        for i, s in enumerate(samples * 2):
            buf = io.BytesIO()
            s["png"].save(buf, format="JPEG")
            sink.write({"__key__": f"k{i:04d}", "jpg": buf.getvalue(), "json": {"label": int(s["cls"])}})
    ds, _, classes = build_datasets(str(tmp_path / "theirs"), data_root=None, img_size=16, val_fraction=0.0)
    assert len(ds) == 32 and classes == ["0", "1", "2"] and ds[0][0].shape == (3, 16, 16)


def test_an_interrupted_write_is_finished_by_a_rerun(folder, shards, tmp_path):
    out = tmp_path / "again"
    assert mae("shards", folder, out, "--shard-size", "16") == 0
    (out / "train-000003.tar").unlink()  # as if stopped before it was renamed
    (out / ".train-000003.tar.123.tmp").write_bytes(b"half")
    before = (out / "train-000004.tar").stat().st_mtime_ns
    assert mae("shards", folder, out, "--shard-size", "16") == 0
    assert (out / "train-000004.tar").stat().st_mtime_ns == before  # complete shards are kept
    assert (out / "train-000003.tar").read_bytes() == (shards / "train-000003.tar").read_bytes()  # deterministic


def test_resize_writes_jpegs_at_the_shorter_side(tmp_path):
    big = tmp_path / "big" / "x"
    big.mkdir(parents=True)
    Image.new("RGB", (120, 60), (200, 10, 10)).save(big / "a.png")
    assert mae("shards", tmp_path / "big", tmp_path / "s", "--resize", "30") == 0
    with tarfile.open(tmp_path / "s" / "train-000000.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        assert Image.open(tar.extractfile(member)).size == (60, 30)


def bad_copy(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bad"
    out.mkdir()
    for f in shards.iterdir():
        if f.suffix == ".tar":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_a_truncated_shard_is_named_or_its_tail_skipped(shards, tmp_path, capsys):
    bad = bad_copy(shards, tmp_path)
    data = (bad / "train-000002.tar").read_bytes()
    (bad / "train-000002.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(MAEError, match=r"shard .*train-000002.tar is truncated or corrupt after member \d+\.\w+"):
        build_datasets(str(bad), data_root=None, img_size=16)
    ds = build_datasets(str(bad), data_root=None, img_size=16, val_fraction=0.0, skip_bad=True)[0]
    assert 80 <= len(ds) < 90 and "its later samples are skipped" in capsys.readouterr().err


def test_a_member_that_does_not_decode_is_named_with_its_shard(shards, tmp_path, capsys):
    bad = bad_copy(shards, tmp_path)
    tar_path = bad / "train-000001.tar"
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
    raw = bytearray(tar_path.read_bytes())
    raw[member.offset_data : member.offset_data + member.size] = b"\0" * member.size  # not a PNG any more
    tar_path.write_bytes(bytes(raw))
    ds = ShardSamples(sorted(str(p) for p in bad.glob("train-*.tar")), img_size=16)
    i = int(((ds.shard == 1) & (ds.offset == member.offset_data)).nonzero()[0])
    with pytest.raises(MAEError, match=rf"cannot read {member.name} in shard .*train-000001.tar"):
        ds[i]
    ds.skip_bad = True
    assert ds[i][0].shape == (3, 16, 16) and int(ds.skipped) == 1


def test_bad_shard_inputs_are_one_line_errors(shards, tmp_path, capsys):
    assert mae("pretrain", *CPU, "--data", tmp_path / "none-{000..003}.tar", "--out", tmp_path / "r") == 2
    assert "no shard matches" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "train-000000.tar", "w"):
        pass
    assert mae("pretrain", *CPU, "--data", empty, "--out", tmp_path / "r2") == 2
    assert "holds no image samples" in capsys.readouterr().err
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    with tarfile.open(shards / "train-000000.tar") as src, tarfile.open(unlabeled / "train-000000.tar", "w") as dst:
        for m in src:
            if m.name.endswith(".png"):
                dst.addfile(m, src.extractfile(m))
    assert mae("finetune", *CPU, "--data", unlabeled, "--out", tmp_path / "r3") == 2
    assert "carry no labels" in capsys.readouterr().err
    counted = bad_copy(shards, tmp_path)
    info = json.loads((shards / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][0] = 17
    (counted / "_info.json").write_text(json.dumps(info))
    assert mae("pretrain", *CPU, "--data", counted, "--out", tmp_path / "r4") == 2
    assert "holds 16 samples, but" in capsys.readouterr().err


def test_an_image_folder_with_a_stray_tar_is_still_a_folder(folder, shards, tmp_path):
    images = tmp_path / "images"
    for f in (folder / "train").rglob("*.png"):
        (images / f.parent.name).mkdir(parents=True, exist_ok=True)
        (images / f.parent.name / f.name).write_bytes(f.read_bytes())
    (images / "backup.tar").write_bytes((shards / "train-000000.tar").read_bytes())
    train, val, classes = build_datasets(str(images), data_root=None, img_size=16, val_fraction=0.1)
    assert classes == sorted(CLASSES) and len(train) + len(val) == 90


def test_test_shards_alone_evaluate_but_do_not_train(shards, tmp_path):
    only = tmp_path / "only-test"
    only.mkdir()
    for f in shards.glob("test-*.tar"):
        (only / f.name).write_bytes(f.read_bytes())
    assert len(build_eval_dataset(str(only), data_root=None, img_size=16)[0]) == 18
    with pytest.raises(MAEError, match="has val or test shards but no training shards"):
        build_datasets(str(only), data_root=None, img_size=16)
