"""Hub datasets (`--data hf:NAME[:SPLIT]`): a small parquet dataset laid out as the Hub's, written by the tests
and loaded offline by the `datasets` library, trains, resumes, fine-tunes and evaluates like the folder it came
from; missing pieces are one-line errors. Skipped where the optional `datasets` package is not installed."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import write_images

from mae_torch.cli import main
from mae_torch.data import build_datasets, build_eval_dataset, has_test_split
from mae_torch.data.hf import parse
from mae_torch.errors import MAEError

datasets = pytest.importorskip("datasets")

CLASSES = ["blue", "green", "red"]
CPU = ["--preset", "smoke", "--device", "cpu", "--precision", "fp32"]


def mae(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """The datasets library's cache in the test's own folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-cache")


def to_parquet(folder: Path, out: Path, split: str, labeled: bool = True) -> None:
    """The PNGs of folder/<class>/ as out/data/SPLIT-00000-of-00001.parquet, images as bytes, labels as a
    ClassLabel."""
    rows = {"image": [], "label": []}
    for y, name in enumerate(CLASSES):
        for p in sorted((folder / name).glob("*.png")):
            rows["image"].append({"bytes": p.read_bytes(), "path": None})
            rows["label"].append(y)
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}
    if not labeled:
        rows.pop("label"), feats.pop("label")
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(feats))
    (out / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", CLASSES, per_class=20)
    write_images(root / "test", CLASSES, per_class=5, seed=1)
    return root


@pytest.fixture(scope="module")
def hub(folder, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("hub") / "colours"
    to_parquet(folder / "train", out, "train")
    to_parquet(folder / "test", out, "test")
    return f"hf:{out}"


def test_names_and_splits_parse():
    assert parse("hf:uoft-cs/cifar10") == ("uoft-cs/cifar10", "train")
    assert parse("hf:uoft-cs/cifar10:test") == ("uoft-cs/cifar10", "test")
    assert parse("hf:/data/my/set") == ("/data/my/set", "train")
    with pytest.raises(MAEError, match="names no dataset"):
        parse("hf:")


def test_a_hub_dataset_reads_as_the_folder_it_came_from(folder, hub):
    train, val, classes = build_datasets(hub, data_root=None, img_size=16, val_fraction=0.1)
    assert classes == CLASSES and len(train) + len(val) == 60 and len(val) == 6  # 2 of each class carved
    by_folder = build_eval_dataset(str(folder / "train"), data_root=None, img_size=16)[0]
    pixels = {by_folder[i][0].numpy().tobytes(): CLASSES[by_folder[i][1]] for i in range(len(by_folder))}
    for ds in (train, val):
        assert all(pixels[x.numpy().tobytes()] == CLASSES[y] for x, y in (ds[i] for i in range(len(ds))))
    test, test_classes = build_eval_dataset(hub, data_root=None, img_size=16)
    assert len(test) == 15 and test_classes == CLASSES and has_test_split(hub)
    assert len(build_datasets(f"{hub}:test", data_root=None, img_size=16, val_fraction=0.0)[0]) == 15


def test_training_streams_resumes_exactly_and_evaluates_on_the_test_split(hub, tmp_path):
    common = [*CPU, "--data", hub, "--no-in-memory", "--num-workers", "2", "--batch-size", "8"]
    assert mae("pretrain", *common, "--epochs", "2", "--out", tmp_path / "whole") == 0
    assert mae("pretrain", *common, "--epochs", "1", "--out", tmp_path / "cut") == 0
    assert mae("pretrain", "--resume", tmp_path / "cut", "--epochs", "2") == 0
    whole, resumed = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("whole", "cut"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    ft = [*CPU, "--data", hub, "--num-workers", "0", "--epochs", "1", "--pretrained", tmp_path / "whole"]
    assert mae("finetune", *ft, "--out", tmp_path / "ft") == 0  # held in memory: a small set
    assert mae("evaluate", "--checkpoint", tmp_path / "ft", "--data", hub, "--device", "cpu", "--json") == 0


def test_a_row_that_does_not_decode_is_named_or_skipped(folder, tmp_path, capsys):
    out = tmp_path / "bad"
    to_parquet(folder / "train", out, "train")
    rows = datasets.load_dataset(str(out))["train"].cast_column("image", datasets.Image(decode=False))
    broken = rows.map(
        lambda r, i: {"image": {"bytes": b"not an image" if i == 3 else r["image"]["bytes"], "path": None}},
        with_indices=True,
    )
    broken.cast_column("image", datasets.Image()).to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    train = build_datasets(f"hf:{out}", data_root=None, img_size=16, val_fraction=0.0)[0]
    with pytest.raises(MAEError, match=r"cannot read image of row 3 of hf:.*bad \(train split\)"):
        train[3]
    skipping = build_datasets(f"hf:{out}", data_root=None, img_size=16, val_fraction=0.0, skip_bad=True)[0]
    assert skipping[3][0].shape == (3, 16, 16) and int(skipping.dataset.skipped) == 1


def test_bad_hub_inputs_are_one_line_errors(folder, hub, tmp_path, capsys, monkeypatch):
    assert mae("pretrain", *CPU, "--data", f"{hub}:validation", "--out", tmp_path / "r") == 2
    assert "has no split 'validation'" in capsys.readouterr().err
    assert mae("pretrain", *CPU, "--data", f"hf:{tmp_path / 'nothing-here'}", "--out", tmp_path / "r2") == 2
    assert "could not load the Hub dataset" in capsys.readouterr().err
    unlabeled = tmp_path / "unlabeled"
    to_parquet(folder / "train", unlabeled, "train", labeled=False)
    assert mae("finetune", *CPU, "--data", f"hf:{unlabeled}", "--out", tmp_path / "r3") == 2
    assert "has no label column" in capsys.readouterr().err
    assert mae("pretrain", *CPU, "--data", f"hf:{unlabeled}", "--epochs", "1", "--out", tmp_path / "r4") == 0
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    assert mae("pretrain", *CPU, "--data", hub, "--out", tmp_path / "r5") == 2
    assert "pip install 'mae-torch[datasets]'" in capsys.readouterr().err
