"""Tests for mae_torch.data: folder layouts, labels, seeded stratified splits, image decoding, CIFAR errors.

Images are tiny PNGs written into tmp_path; CIFAR is faked with monkeypatch, so nothing touches the network.
"""

import os
import urllib.error
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from mae_torch.data import (
    IMAGE_EXTENSIONS,
    ImageFiles,
    TensorImages,
    build_datasets,
    build_eval_dataset,
    default_data_root,
)
from mae_torch.errors import MAEError


def _png(path, size=8, color=(10, 20, 30), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (size, size), color).save(path)
    return str(path)


def _folder(root, counts: dict[str, int]):
    """root/<class>/<i>.png with counts[class] images each; returns root as str."""
    for name, n in counts.items():
        for i in range(n):
            _png(root / name / f"{i:02d}.png")
    return str(root)


def _paths(ds) -> list[str]:
    """File paths of an ImageFiles or of a split (Subset) of one."""
    if isinstance(ds, ImageFiles):
        return ds.paths
    return [ds.dataset.paths[i] for i in ds.indices]


def test_labeled_folder_gives_classes_and_labels(tmp_path):
    root = _folder(tmp_path, {"dog": 3, "cat": 2})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _png(tmp_path / ".hidden" / "x.png")  # hidden folder: not a class
    _png(tmp_path / "cat" / "deeper" / "z.png")  # below a class folder: still that class
    ds, classes = build_eval_dataset(root, data_root=None, img_size=8)
    assert classes == ["cat", "dog"]
    assert ds.labels == [0, 0, 0, 1, 1, 1]
    assert [os.path.relpath(p, root) for p in ds.paths] == [
        "cat/00.png",
        "cat/01.png",
        os.path.join("cat", "deeper", "z.png"),
        "dog/00.png",
        "dog/01.png",
        "dog/02.png",
    ]
    x, y = ds[4]
    assert (x.shape, x.dtype, y) == ((3, 8, 8), torch.uint8, 1)
    assert x[:, 0, 0].tolist() == [10, 20, 30]


def test_stratified_split_counts_no_overlap_and_seeded(tmp_path):
    root = _folder(tmp_path, {"a": 10, "b": 5, "c": 2})
    train, val, classes = build_datasets(root, data_root=None, img_size=8, val_fraction=0.2, seed=0)
    assert classes == ["a", "b", "c"]
    # round(0.2 * n) per class, but at least one from a class of 2+: a 2, b 1, c 1
    assert Counter(val.labels) == {0: 2, 1: 1, 2: 1}
    assert Counter(train.labels) == {0: 8, 1: 4, 2: 1}
    assert not set(_paths(train)) & set(_paths(val))
    assert len(set(_paths(train)) | set(_paths(val))) == 17
    assert [val[i][1] for i in range(len(val))] == list(val.labels)  # labels attribute matches the items

    again = build_datasets(root, data_root=None, img_size=8, val_fraction=0.2, seed=0)[1]
    assert _paths(again) == _paths(val)
    others = [_paths(build_datasets(root, data_root=None, img_size=8, val_fraction=0.2, seed=s)[1]) for s in (1, 2, 3)]
    assert any(o != _paths(val) for o in others)


def test_unlabeled_split_and_zero_fraction(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i}.png")
    train, val, classes = build_datasets(str(tmp_path), data_root=None, img_size=8, val_fraction=0.3)
    assert classes is None and train.labels is None and val.labels is None
    assert (len(train), len(val)) == (7, 3)
    assert val[0][1] == -1
    train, val, _ = build_datasets(str(tmp_path), data_root=None, img_size=8, val_fraction=0.0)
    assert (len(train), len(val)) == (10, 0)


def test_train_val_layout_used_as_given_and_test_kept_for_eval(tmp_path):
    _folder(tmp_path / "train", {"a": 3, "b": 3})
    _folder(tmp_path / "val", {"a": 1, "b": 2})
    _folder(tmp_path / "test", {"a": 4, "b": 4})
    train, val, classes = build_datasets(str(tmp_path), data_root=None, img_size=8)
    assert classes == ["a", "b"]
    assert len(train) == 6 and all(f"{os.sep}train{os.sep}" in p for p in _paths(train))
    assert val.labels == [0, 1, 1] and all(f"{os.sep}val{os.sep}" in p for p in _paths(val))
    test, test_classes = build_eval_dataset(str(tmp_path), data_root=None, img_size=8)
    assert test_classes == ["a", "b"] and len(test) == 8
    assert all(f"{os.sep}test{os.sep}" in p for p in test.paths)


def test_test_folder_never_used_for_validation(tmp_path):
    _folder(tmp_path / "train", {"a": 5, "b": 5})
    _folder(tmp_path / "test", {"a": 3, "b": 3})
    train, val, _ = build_datasets(str(tmp_path), data_root=None, img_size=8, val_fraction=0.2)
    assert (len(train), len(val)) == (8, 2)
    assert all(f"{os.sep}train{os.sep}" in p for p in _paths(train) + _paths(val))
    # without a test/ folder, evaluation falls back to val/
    _folder(tmp_path / "only" / "train", {"a": 2, "b": 2})
    _folder(tmp_path / "only" / "val", {"a": 1, "b": 1})
    ds, _ = build_eval_dataset(str(tmp_path / "only"), data_root=None, img_size=8)
    assert all(f"{os.sep}val{os.sep}" in p for p in ds.paths)


def test_test_folder_without_train_is_an_error(tmp_path):
    _folder(tmp_path, {"a": 2, "test": 2})  # test/ must not silently become a training class
    with pytest.raises(MAEError, match="no train/"):
        build_datasets(str(tmp_path), data_root=None, img_size=8)


def test_flat_and_nested_folders_are_unlabeled(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"{i}.png")
    _png(flat / "sub" / "x.png")  # images directly in the root: subfolders are not classes
    train, val, classes = build_datasets(str(flat), data_root=None, img_size=8, val_fraction=0.3)
    assert classes is None and train.labels is None and len(train) + len(val) == 4
    with pytest.raises(MAEError, match="unlabeled: fine-tuning needs .*<class>"):
        build_datasets(str(flat), data_root=None, img_size=8, need_labels=True)
    with pytest.raises(MAEError, match="no class subfolders"):
        build_eval_dataset(str(flat), data_root=None, img_size=8)

    nested = tmp_path / "nested"
    _png(nested / "a" / "b" / "1.png")  # no images directly in a/: not a class folder
    _png(nested / "a" / "b" / "2.png")
    train, val, classes = build_datasets(str(nested), data_root=None, img_size=8, val_fraction=0.5)
    assert classes is None and (len(train), len(val)) == (1, 1)


def test_need_labels_with_one_class_raises(tmp_path):
    root = _folder(tmp_path, {"only": 4})
    with pytest.raises(MAEError, match="at least 2 classes"):
        build_datasets(root, data_root=None, img_size=8, need_labels=True)


def test_images_converted_to_rgb_and_resized(tmp_path):
    gray = _png(tmp_path / "g.png", size=20, color=100, mode="L")
    rgba = _png(tmp_path / "a.png", size=20, color=(200, 50, 7, 128), mode="RGBA")
    ds = ImageFiles([gray, rgba], None, img_size=16)
    x, y = ds[0]
    assert (x.shape, x.dtype, y) == ((3, 16, 16), torch.uint8, -1)
    assert torch.all(x == 100)  # a constant image stays constant under bicubic resizing
    x, _ = ds[1]
    assert x.shape == (3, 16, 16) and x[:, 5, 5].tolist() == [200, 50, 7]
    x, _ = ImageFiles([rgba], [3], img_size=20, in_chans=1)[0]
    assert x.shape == (1, 20, 20)


def test_resize_keeps_content(tmp_path):
    img = np.zeros((20, 20, 3), dtype=np.uint8)
    img[:, 10:] = 255  # left half black, right half white
    path = str(tmp_path / "half.png")
    Image.fromarray(img).save(path)
    x, _ = ImageFiles([path], None, img_size=16)[0]
    assert x[:, :, 0].max() == 0 and x[:, :, -1].min() == 255


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(MAEError, match=r"cannot read image .*bad\.png.*remove or replace it"):
        ImageFiles([str(bad)], None, img_size=8)[0]


def test_missing_file_and_empty_folders_raise(tmp_path):
    with pytest.raises(MAEError, match="data folder not found: .*nope.*cifar10"):
        build_datasets(str(tmp_path / "nope"), data_root=None, img_size=8)
    a_file = _png(tmp_path / "one.png")
    with pytest.raises(MAEError, match="is a file, not a folder"):
        build_datasets(a_file, data_root=None, img_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MAEError, match="no images found in .*empty.*\\.png"):
        build_datasets(str(empty), data_root=None, img_size=8)
    (empty / "readme.txt").write_text("hello")
    (empty / "sub").mkdir()
    with pytest.raises(MAEError, match="no images found") as err:
        build_eval_dataset(str(empty), data_root=None, img_size=8)
    assert all(ext in str(err.value) for ext in IMAGE_EXTENSIONS)


def test_too_small_and_bad_fraction_raise(tmp_path):
    _png(tmp_path / "one" / "x.png")
    with pytest.raises(MAEError, match="too small to hold out validation.*PATH/val"):
        build_datasets(str(tmp_path / "one"), data_root=None, img_size=8)
    for bad in (1.0, -0.1):
        with pytest.raises(MAEError, match="val_fraction"):
            build_datasets(str(tmp_path / "one"), data_root=None, img_size=8, val_fraction=bad)


def test_val_class_mismatch_raises(tmp_path):
    _folder(tmp_path / "train", {"cat": 2, "dog": 2})
    _folder(tmp_path / "val", {"cat": 1, "cow": 1})
    with pytest.raises(MAEError, match=r"missing in val \['dog'\], only in val \['cow'\]"):
        build_datasets(str(tmp_path), data_root=None, img_size=8)


def test_cifar_without_network_raises_quickly(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(MAEError) as err:
        build_datasets("CIFAR10", data_root=str(tmp_path), img_size=32)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"could not download CIFAR-10 into {tmp_path} (URLError:")
    assert "--data PATH" in msg and "--data-root" in msg and "cifar-10-python.tar.gz" in msg


class _FakeCIFAR:
    """Stands in for torchvision's CIFAR10: same attributes, 40 train or 10 test images, two classes."""

    calls: list[bool] = []

    def __init__(self, root, train, download):
        _FakeCIFAR.calls.append(train)
        n = 40 if train else 10
        self.data = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.data[0] = 0
        self.data[0, :, :, 0] = 255  # image 0 is pure red
        self.targets = [i % 2 for i in range(n)]
        self.classes = ["airplane", "automobile"]


def test_cifar_conversion_and_splits(monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR)
    _FakeCIFAR.calls = []
    train, val, classes = build_datasets("cifar10", data_root=None, img_size=32, val_fraction=0.25)
    assert _FakeCIFAR.calls == [True]  # validation comes from the train split, never the test split
    assert classes == ["airplane", "automobile"]
    assert (len(train), len(val)) == (30, 10)
    assert Counter(val.labels.tolist()) == {0: 5, 1: 5}
    base = train.dataset
    assert isinstance(base, TensorImages)
    assert base.images.shape == (40, 3, 32, 32) and base.images.dtype == torch.uint8
    assert torch.equal(base.images[3], torch.from_numpy(_FakeCIFAR(None, True, False).data[3]).permute(2, 0, 1))

    test, classes = build_eval_dataset("cifar10", data_root=None, img_size=16)
    assert _FakeCIFAR.calls[-1] is False and len(test) == 10
    x, y = test[0]
    assert (x.shape, x.dtype, y) == ((3, 16, 16), torch.uint8, 0)
    assert x[:, 8, 8].tolist() == [255, 0, 0]  # bicubic resize of a constant image keeps it
    gray, _ = build_eval_dataset("cifar10", data_root=None, img_size=32, in_chans=1)
    assert gray[0][0].shape == (1, 32, 32) and 70 <= gray[0][0][0, 0, 0] <= 80  # 0.2989 * 255


def test_default_data_root_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_root() == os.path.join(str(tmp_path), "mae-torch", "data")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_root() == os.path.join(os.path.expanduser("~"), ".cache", "mae-torch", "data")


def test_cmyk_16_bit_and_tiny_images_become_rgb_uint8(tmp_path):
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((12, 12), 60000, dtype=np.uint16)).save(deep)  # 16-bit greyscale, near white
    tiny = _png(tmp_path / "t.png", size=2, color=(0, 128, 255))
    ds = ImageFiles([str(cmyk), str(deep), tiny], None, img_size=8)
    red, grey, small = (ds[i][0] for i in range(3))
    assert red.shape == grey.shape == small.shape == (3, 8, 8)
    assert red[0].float().mean() > 200 and red[1:].float().mean() < 60
    assert int(grey.min()) > 200  # scaled from 16 bits, not clipped or wrapped
    assert small[:, 4, 4].tolist() == [0, 128, 255]


def test_truncated_images_fail_by_default_and_are_skipped_on_request(tmp_path, capsys):
    _folder(tmp_path / "data", {"a": 6, "b": 6})
    good = tmp_path / "data" / "a" / "00.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(good)
    (tmp_path / "data" / "a" / "99.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
    train, val, _ = build_datasets(str(tmp_path / "data"), data_root=None, img_size=8, val_fraction=0.2)
    with pytest.raises(MAEError, match=r"99\.png"):
        [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    train, val, _ = build_datasets(str(tmp_path / "data"), data_root=None, img_size=8, val_fraction=0.2, skip_bad=True)
    assert "skipped" not in capsys.readouterr().err  # nothing is decoded before the data is read
    items = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    assert len(items) == 13 and all(x.shape == (3, 8, 8) for x, _ in items)
    assert int(train.dataset.skipped) == 1  # the next readable file stood in for 99.png, once
    assert "skipped unreadable image" in (err := capsys.readouterr().err) and "99.png" in err
