"""End-to-end tests of the `mae` command: pretrain -> finetune -> evaluate, resume, early stopping, errors.

Everything runs on the CPU with the `smoke` preset on tiny PNGs written into tmp dirs (two colour classes,
so a classifier has something to learn). Commands run in-process through `mae_torch.cli.main` (it returns
the exit status); a few run as `python -m mae_torch` subprocesses to check that a user error prints exactly
one line on stderr and no traceback, and that `--help` imports no torch. Nothing touches the network: CIFAR
is faked with monkeypatch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import load_file

import mae_torch
from mae_torch import cli, engine
from mae_torch.cli import main
from mae_torch.config import PRESET_DIR, preset_names

CPU = ["--preset", "smoke", "--num-workers", "0", "--device", "cpu"]
PER_CLASS = 32  # images per class in the shared data folder
COLOURS = {"blue": 2, "green": 1, "red": 0}  # class name -> its dominant RGB channel


def steps_per_epoch(per_class: int = PER_CLASS, classes: int = 2, batch: int = 16, val_fraction: float = 0.1) -> int:
    """Optimizer steps per epoch: the training split is what remains after the stratified validation carve."""
    return (classes * (per_class - round(val_fraction * per_class))) // batch


def write_images(root: Path, names: list[str], per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """root/<name>/<i>.png: 16x16 RGB noise whose channel COLOURS[name] is bright, so classes are learnable."""
    rs = np.random.RandomState(seed)
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rs.randint(0, 80, (16, 16, 3)).astype(np.uint8)
            arr[..., COLOURS[name]] = rs.randint(170, 256, (16, 16))
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return root


def mae(*args) -> int:
    return main([str(a) for a in args])


def fresh_rng(seed: int = 0) -> None:
    """Reset the global RNG before an in-process run whose weights are compared with another run's.

    Runs seed themselves (test_same_seed_gives_same_weights_in_one_process checks it); this only keeps
    the comparisons independent of what ran before them in the process.
    """
    torch.manual_seed(seed)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors" if path.is_dir() else path))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights of {a} and {b} differ by up to {worst:.3g}"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("mae: error: ")
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU OpenMP's spin-waiting makes each run
    several times slower (0.3 s -> up to 8 s a run, measured on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data"), ["blue", "red"])


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("runs") / "pretrain"
    assert mae("pretrain", *CPU, "--data", data_dir, "--out", run) == 0
    return run


@pytest.fixture(scope="session")
def finetune_run(tmp_path_factory, data_dir, pretrain_run) -> Path:
    run = tmp_path_factory.mktemp("runs") / "finetune"
    assert mae("finetune", *CPU, "--data", data_dir, "--pretrained", pretrain_run, "--out", run) == 0
    return run


# ---------------------------------------------------------------- the pipeline


def test_pretrain_writes_a_complete_run_directory(pretrain_run):
    cfg = yaml.safe_load((pretrain_run / "config.yaml").read_text())
    assert {"model", "train", "run"} <= cfg.keys()
    assert cfg["command"] == "pretrain" and cfg["model"]["img_size"] == 16 and cfg["train"]["epochs"] == 2

    rows = metrics(pretrain_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert {"epoch", "train_loss", "val_loss", "lr", "img_per_s"} <= r.keys()
        assert all(math.isfinite(r[k]) for k in ("train_loss", "val_loss", "lr", "img_per_s"))
    assert [r["step"] for r in rows] == [steps_per_epoch(), 2 * steps_per_epoch()]

    ckpt = torch.load(pretrain_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "epoch", "step", "stopper", "rng"} <= ckpt.keys()
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 * steps_per_epoch()
    state = weights(pretrain_run)
    assert state.keys() == ckpt["model"].keys()
    assert {"mask_token", "decoder_pred.weight", "patch_embed.proj.weight"} <= state.keys()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)  # the last weights, both places
    meta = json.loads((pretrain_run / "model.json").read_text())
    assert meta["arch"] == "mae" and meta["model"]["embed_dim"] == 32

    assert list(pretrain_run.glob("events.out.tfevents.*"))
    with Image.open(pretrain_run / "reconstructions.png") as im:
        im.verify()
    with Image.open(pretrain_run / "reconstructions.png") as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_pretrain_logs_scalars_and_reconstructions_to_tensorboard(pretrain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(pretrain_run))
    acc.Reload()
    tags = acc.Tags()
    assert {"train_loss", "val_loss", "lr"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("val_loss")] == [1, 2]
    assert "reconstructions" in tags["images"]
    assert acc.Images("reconstructions")[-1].width > 0


def test_saved_config_reruns_the_same_config(pretrain_run, tmp_path):
    rerun = tmp_path / "rerun"
    assert mae("pretrain", "--config", pretrain_run / "config.yaml", "--out", rerun) == 0
    assert yaml.safe_load((rerun / "config.yaml").read_text()) == yaml.safe_load(
        (pretrain_run / "config.yaml").read_text()
    )


def test_finetune_from_pretrained_run(finetune_run, pretrain_run):
    assert (finetune_run / "best.safetensors").exists() and (finetune_run / "model.safetensors").exists()
    rows = metrics(finetune_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["val_acc"] <= 1 for r in rows)
    meta = json.loads((finetune_run / "best.json").read_text())
    assert meta["arch"] == "vit" and meta["classes"] == ["blue", "red"]
    assert weights(finetune_run / "best.safetensors")["head.weight"].shape == (2, 32)
    cfg = yaml.safe_load((finetune_run / "config.yaml").read_text())
    assert cfg["command"] == "finetune" and cfg["run"]["pretrained"] == str(pretrain_run)


def test_evaluate_prints_one_json_object(finetune_run, data_dir, capsys):
    capsys.readouterr()
    assert mae("evaluate", "--checkpoint", finetune_run, "--data", data_dir, "--device", "cpu", "--json") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert set(result) == {"top1", "loss", "n"}
    assert 0 <= result["top1"] <= 1 and math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["n"] == 2 * PER_CLASS

    assert mae("evaluate", "--checkpoint", finetune_run, "--data", data_dir, "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert text.startswith("top1 ") and f"n {2 * PER_CLASS}" in text


def test_finetune_learns_the_colour_classes(data_dir, tmp_path, capsys):
    run = tmp_path / "ft"
    fresh_rng()
    args = ["--lr", "5e-3", "--warmup-epochs", "0", "--epochs", "3", "--precision", "fp32"]
    assert mae("finetune", *CPU, "--data", data_dir, "--out", run, *args) == 0
    assert "| lr 0.005 = --lr |" in capsys.readouterr().out  # not derived from blr, so not written as blr x batch
    rows = metrics(run)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert mae("evaluate", "--checkpoint", run, "--data", data_dir, "--device", "cpu", "--json") == 0
    assert json.loads(capsys.readouterr().out)["top1"] >= 0.95  # red vs blue: labels must match the images


def test_evaluate_matches_classes_by_name(tmp_path, capsys):
    """A test folder with a subset of the classes is scored against the checkpoint's own class indices."""
    from mae_torch.models import build_vit, load_weights, model_config_from

    data = write_images(tmp_path / "rgb", ["blue", "green", "red"], per_class=16)
    run = tmp_path / "ft"
    fresh_rng()
    args = ["--lr", "5e-3", "--warmup-epochs", "0", "--epochs", "3", "--batch-size", "8", "--precision", "fp32"]
    assert mae("finetune", *CPU, "--data", data, "--out", run, *args) == 0
    subset = tmp_path / "green-red"  # indices 0, 1 here; 1, 2 in the checkpoint
    for name in ("green", "red"):
        shutil.copytree(data / name, subset / name)

    state, meta = load_weights(run)
    m = model_config_from(meta)
    vit = build_vit(m, len(meta["classes"]))
    vit.load_state_dict(state)
    vit.eval()
    mean, std = torch.tensor(m.mean).view(1, 3, 1, 1), torch.tensor(m.std).view(1, 3, 1, 1)
    correct = n = 0
    with torch.no_grad():
        for name in ("green", "red"):
            for path in sorted((subset / name).glob("*.png")):
                x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
                correct += meta["classes"][vit((x - mean) / std).argmax(-1).item()] == name
                n += 1
    assert correct / n >= 0.9  # the model learned the colours, so a label mix-up would show

    capsys.readouterr()
    cmd = ["evaluate", "--checkpoint", run, "--data", subset, "--device", "cpu", "--precision", "fp32", "--json"]
    assert mae(*cmd) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == n
    assert result["top1"] == pytest.approx(correct / n, abs=1e-9)


def test_evaluate_on_a_single_class_folder(finetune_run, data_dir, tmp_path, capsys):
    """A test folder with one of the checkpoint's classes is a subset too, not a 'needs 2 classes' error."""
    only_red = tmp_path / "only-red"
    shutil.copytree(data_dir / "red", only_red / "red")
    capsys.readouterr()
    rc = mae("evaluate", "--checkpoint", finetune_run, "--data", only_red, "--device", "cpu", "--json")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["n"] == PER_CLASS


# ---------------------------------------------------------------- fine-tuning from a pretrained encoder


def test_finetune_takes_encoder_settings_and_weights_from_pretrained(data_dir, tmp_path, capsys):
    pre, ft = tmp_path / "pre16", tmp_path / "ft"
    assert mae("pretrain", *CPU, "--data", data_dir, "--out", pre, "--embed-dim", "16", "--epochs", "1") == 0
    capsys.readouterr()
    # smoke's encoder is 32 wide; a vanishing lr leaves the loaded encoder as it was
    assert mae("finetune", *CPU, "--data", data_dir, "--out", ft, "--pretrained", pre, "--lr", "1e-12") == 0
    assert "embed_dim=32" in capsys.readouterr().out  # the note naming the replaced setting
    assert yaml.safe_load((ft / "config.yaml").read_text())["model"]["embed_dim"] == 16

    encoder = weights(pre / "best.safetensors")
    tuned = weights(ft)
    shared = [k for k in tuned if not k.startswith(("head.", "fc_norm."))]
    assert "blocks.1.mlp.fc2.weight" in shared and "decoder_pred.weight" not in tuned
    for k in shared:
        assert torch.allclose(tuned[k], encoder[k], atol=1e-7), k


def test_finetune_with_missing_pretrained_exits_2(data_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert mae("finetune", *CPU, "--data", data_dir, "--out", tmp_path / "ft", "--pretrained", missing) == 2
    assert str(missing) in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- resume


def interrupt_after_checkpoint(monkeypatch, epochs_done: int) -> None:
    """Raise KeyboardInterrupt (like Ctrl-C) right after the checkpoint of epoch `epochs_done` is on disk."""
    write = engine.atomic_write

    def atomic_write(path, fn):
        write(path, fn)
        if path.name == "checkpoint.pt":
            if torch.load(path, map_location="cpu", weights_only=True)["epoch"] + 1 == epochs_done:
                raise KeyboardInterrupt

    monkeypatch.setattr(engine, "atomic_write", atomic_write)


def test_resume_continues_to_more_epochs(data_dir, tmp_path):
    run = tmp_path / "run"
    assert mae("pretrain", *CPU, "--data", data_dir, "--out", run, "--epochs", "2") == 0
    assert mae("pretrain", "--resume", run, "--epochs", "4") == 0
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows] == [steps_per_epoch() * e for e in (1, 2, 3, 4)]
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 4 * steps_per_epoch()


def test_resume_after_interrupt_matches_an_uninterrupted_run(data_dir, tmp_path, monkeypatch, capsys):
    args = [*CPU, "--data", data_dir, "--epochs", "4", "--precision", "fp32", "--seed", "3"]
    fresh_rng()
    assert mae("pretrain", *args, "--out", tmp_path / "a") == 0

    interrupt_after_checkpoint(monkeypatch, epochs_done=2)
    fresh_rng()
    assert mae("pretrain", *args, "--out", tmp_path / "b") == 130
    assert "--resume" in capsys.readouterr().err
    assert [r["epoch"] for r in metrics(tmp_path / "b")] == [1, 2]
    monkeypatch.undo()

    fresh_rng(123)  # the resumed run must restore its RNG from the checkpoint, not depend on ours
    assert mae("pretrain", "--resume", tmp_path / "b") == 0
    assert [r["epoch"] for r in metrics(tmp_path / "b")] == [1, 2, 3, 4]
    assert_same_weights(tmp_path / "a", tmp_path / "b", atol=1e-6)
    assert [r["val_loss"] for r in metrics(tmp_path / "a")] == pytest.approx(
        [r["val_loss"] for r in metrics(tmp_path / "b")], abs=1e-6
    )


def test_resume_remembers_the_extended_epochs(data_dir, tmp_path, monkeypatch):
    """A run extended with `--resume RUN --epochs 4` and interrupted must finish its 4 epochs on a plain
    `--resume RUN`: the extension is written to config.yaml, so the second resume does not stop at 2 epochs."""
    run = tmp_path / "run"
    assert mae("pretrain", *CPU, "--data", data_dir, "--out", run, "--epochs", "2") == 0
    interrupt_after_checkpoint(monkeypatch, epochs_done=3)
    assert mae("pretrain", "--resume", run, "--epochs", "4") == 130
    monkeypatch.undo()
    assert mae("pretrain", "--resume", run) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 4
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3, 4]


def test_resuming_an_early_stopped_run_trains_no_further(data_dir, tmp_path):
    """An uninterrupted run stopped after epoch 2; resuming it with the same settings must not add epochs.
    The restored early stopper is consulted before training another epoch."""
    run = tmp_path / "run"
    args = ["--epochs", "10", "--patience", "1", "--min-delta", "1e9"]
    assert mae("pretrain", *CPU, "--data", data_dir, "--out", run, *args) == 0
    assert len(metrics(run)) == 2
    assert mae("pretrain", "--resume", run) == 0
    assert [r["epoch"] for r in metrics(run)] == [1, 2]
    assert mae("pretrain", "--resume", run, "--patience", "3") == 0  # more patience: it may go on
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3, 4]


def test_resume_without_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    assert mae("pretrain", "--resume", tmp_path / "run") == 2
    assert "cannot resume" in one_error_line(capsys.readouterr().err)


def test_same_seed_gives_same_weights_in_one_process(data_dir, tmp_path):
    """`--seed` covers the initial weights too: two runs with one seed in one process are identical, whatever
    the global RNG did in between."""
    args = [*CPU, "--data", data_dir, "--epochs", "1", "--precision", "fp32", "--seed", "7"]
    assert mae("pretrain", *args, "--out", tmp_path / "a") == 0
    torch.rand(100)  # whatever ran before must not matter
    assert mae("pretrain", *args, "--out", tmp_path / "b") == 0
    assert_same_weights(tmp_path / "a", tmp_path / "b", atol=0)


# ---------------------------------------------------------------- early stopping


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_pretrain(data_dir, tmp_path, patience, capsys):
    run = tmp_path / "run"
    args = ["--epochs", "10", "--patience", patience, "--min-delta", "1e9"]  # only the first epoch improves
    assert mae("pretrain", *CPU, "--data", data_dir, "--out", run, *args) == 0
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, 2 + patience))
    assert [r["best"] for r in rows] == [True] + [False] * patience
    assert "early stop" in capsys.readouterr().out


def test_early_stopping_finetune_on_val_acc(data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--epochs", "10", "--monitor", "val_acc", "--patience", "1", "--min-delta", "1e9"]
    assert mae("finetune", *CPU, "--data", data_dir, "--out", run, *args) == 0
    assert [r["epoch"] for r in metrics(run)] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["monitor"] == "val_acc"


# ---------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_matches_the_full_batch(data_dir, tmp_path, monkeypatch):
    """2 x 8 accumulated must equal one batch of 16: same first gradient (the loss is averaged over
    micro-batches, which AdamW's scale invariance would hide in the weights) and nearly the same weights."""
    first_grads: list[torch.Tensor] = []  # the gradient at each run's first optimizer step
    seen: list = []
    step = torch.optim.AdamW.step

    def record_first(self, *args, **kwargs):
        if not any(self is o for o in seen):
            seen.append(self)
            grads = [p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
            first_grads.append(torch.cat(grads).clone())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record_first)
    args = [*CPU, "--data", data_dir, "--epochs", "1", "--precision", "fp32", "--batch-size", "16"]
    for micro in (8, 16):
        fresh_rng()
        assert mae("pretrain", *args, "--device-batch-size", micro, "--out", tmp_path / f"micro{micro}") == 0
    accumulated, full = first_grads
    assert accumulated.norm() > 0
    assert torch.allclose(accumulated, full, rtol=1e-4, atol=1e-7), (accumulated.norm(), full.norm())
    assert_same_weights(tmp_path / "micro8", tmp_path / "micro16", atol=1e-5)


# ---------------------------------------------------------------- bad input: exit 2, one line, no traceback


def _garbage_png(data: Path) -> Path:
    bad = data / "red" / "zz-corrupt.png"
    bad.write_bytes(b"this is not a PNG\x00\x01" * 8)
    return bad


BAD_INPUTS = {
    # name: (argv built from (tmp_path, data_dir, pretrain_run, finetune_run), expected text in the message)
    "missing data folder": (lambda t, d, p, f: ["pretrain", *CPU, "--data", t / "nope"], "data folder not found"),
    "empty data folder": (lambda t, d, p, f: ["pretrain", *CPU, "--data", mkdir(t / "empty")], "no images found"),
    "only a text file": (
        lambda t, d, p, f: ["pretrain", *CPU, "--data", write(t / "txt" / "notes.txt", "hi").parent],
        "no images found",
    ),
    "unknown preset": (lambda t, d, p, f: ["pretrain", "--preset", "nope", "--data", d], "unknown preset 'nope'"),
    "mask ratio 0": (lambda t, d, p, f: ["pretrain", *CPU, "--data", d, "--mask-ratio", "0"], "mask_ratio"),
    "mask ratio 1.5": (lambda t, d, p, f: ["pretrain", *CPU, "--data", d, "--mask-ratio", "1.5"], "mask_ratio"),
    "patch size not dividing": (
        lambda t, d, p, f: ["pretrain", *CPU, "--data", d, "--patch-size", "5"],
        "does not divide img_size",
    ),
    "unknown key in config file": (
        lambda t, d, p, f: [
            "pretrain",
            *CPU,
            "--data",
            d,
            "--config",
            write(t / "c.yaml", "model:\n  embed_dimm: 8\n"),
        ],
        "unknown key 'embed_dimm'",
    ),
    "finetune on unlabeled folder": (
        lambda t, d, p, f: ["finetune", *CPU, "--data", flat_copy(d, t / "flat")],
        "no class subfolders",
    ),
    "resume without checkpoint": (lambda t, d, p, f: ["pretrain", "--resume", mkdir(t / "empty-run")], "cannot resume"),
    "evaluate a pretraining checkpoint": (
        lambda t, d, p, f: ["evaluate", "--checkpoint", p, "--data", d, "--device", "cpu", "--num-workers", "0"],
        "MAE pretraining weights",
    ),
    "evaluate with an unknown class": (
        lambda t, d, p, f: [
            "evaluate",
            *("--checkpoint", f, "--device", "cpu", "--num-workers", "0"),
            *("--data", write_images(t / "rg", ["red", "green"], per_class=2)),
        ],
        "['green']",
    ),
    "evaluate missing weights": (
        lambda t, d, p, f: ["evaluate", "--checkpoint", t / "nope.safetensors", "--data", d, "--device", "cpu"],
        "weights not found",
    ),
    "pretrained folder without weights": (
        lambda t, d, p, f: ["finetune", *CPU, "--data", d, "--pretrained", mkdir(t / "not-a-run")],
        "no weights in",
    ),
    "pretrain monitoring val_acc": (
        lambda t, d, p, f: ["pretrain", *CPU, "--data", d, "--monitor", "val_acc", "--epochs", "1"],
        "--monitor val_loss",
    ),
    "corrupt image": (
        lambda t, d, p, f: ["pretrain", *CPU, "--data", t / "corrupt", "--epochs", "1"],
        "corrupt/red/zz-corrupt.png",
    ),
}


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def flat_copy(data: Path, dest: Path) -> Path:
    """All images of a labeled folder side by side in one folder: an unlabeled set."""
    dest.mkdir()
    for src in data.glob("*/*.png"):
        shutil.copy(src, dest / f"{src.parent.name}-{src.name}")
    return dest


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, tmp_path, data_dir, pretrain_run, finetune_run, capsys):
    build, expected = BAD_INPUTS[case]
    if case == "corrupt image":
        shutil.copytree(data_dir, tmp_path / "corrupt")
        _garbage_png(tmp_path / "corrupt")
    argv = build(tmp_path, data_dir, pretrain_run, finetune_run)
    if argv[0] != "evaluate" and "--resume" not in argv:
        argv += ["--out", tmp_path / "run"]
    capsys.readouterr()
    assert mae(*argv) == 2
    assert expected in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_no_validation_split_exits_2_with_one_line(command, data_dir, tmp_path, capsys):
    """--val-fraction 0 leaves nothing to monitor: a one-line error naming the fix, before any training."""
    capsys.readouterr()
    rc = mae(command, *CPU, "--data", data_dir, "--out", tmp_path / "run", "--val-fraction", "0", "--epochs", "1")
    assert rc == 2
    assert "--val-fraction above 0" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_existing_out_needs_overwrite(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    write(run / "old.txt", "earlier results")
    args = ["pretrain", *CPU, "--data", data_dir, "--out", run, "--epochs", "1"]
    capsys.readouterr()
    assert mae(*args) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert (run / "old.txt").exists() and not (run / "metrics.jsonl").exists()
    assert mae(*args, "--overwrite") == 0
    assert not (run / "old.txt").exists() and len(metrics(run)) == 1


def test_cifar10_without_network_exits_2(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    argv = ["pretrain", *CPU, "--data", "cifar10", "--data-root", tmp_path / "cifar", "--out", tmp_path / "run"]
    capsys.readouterr()
    assert mae(*argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "could not download CIFAR-10" in line and "--data PATH" in line


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mae_torch", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_subprocess_user_errors_print_one_line(tmp_path):
    proc = run_cli("pretrain", *CPU, "--data", tmp_path / "nope", "--out", tmp_path / "run")
    assert proc.returncode == 2
    assert "data folder not found" in one_error_line(proc.stderr)


def test_subprocess_corrupt_image_in_a_worker_prints_one_line(tmp_path, data_dir):
    """With --num-workers 1 the error is raised in a DataLoader worker and arrives wrapped in a traceback."""
    data = tmp_path / "corrupt"
    shutil.copytree(data_dir, data)
    bad = _garbage_png(data)
    cmd = ["finetune", *CPU, "--num-workers", "1", "--data", data, "--out", tmp_path / "run", "--epochs", "1"]
    proc = run_cli(*cmd)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert f"cannot read image {bad}" in line


# ---------------------------------------------------------------- help and presets


@pytest.mark.parametrize(
    "command, options",
    [
        ([], ["pretrain", "finetune", "evaluate"]),
        (["pretrain"], ["--mask-ratio", "--batch-size", "--device-batch-size", "--patience", "--resume"]),
        (["finetune"], ["--pretrained", "--batch-size", "--device-batch-size", "--patience", "--resume"]),
        (["evaluate"], ["--checkpoint", "--data", "--json"]),
    ],
)
def test_help(command, options, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in options)


HEAVY = ("torch", "timm", "torchvision", "tensorboard", "matplotlib", "numpy")  # seconds to import, together


def imported_modules(importtime_log: str) -> list[str]:
    """The module names in `python -X importtime` output: lines `import time: SELF_US | CUMULATIVE_US | NAME`
    (the header line, `import time: self [us] | ...`, has no numbers and is skipped)."""
    return re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", importtime_log, flags=re.MULTILINE)


@pytest.mark.parametrize("command", [[], *([c.name] for c in cli.COMMANDS)], ids=lambda c: " ".join(c) or "mae")
def test_help_imports_no_torch(command):
    """`mae --help` and `mae COMMAND --help` answer without torch & co.: their import alone took seconds."""
    cmd = [sys.executable, "-X", "importtime", "-m", "mae_torch", *command, "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: mae" in proc.stdout
    names = imported_modules(proc.stderr)
    assert "mae_torch.cli" in names  # the log was parsed: it names the modules imported
    heavy = [n for n in names if n.startswith(HEAVY)]
    assert not heavy, f"--help imported {heavy[:10]}"


@pytest.mark.parametrize("command", [c.name for c in cli.COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mae {command} ")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert cli.BY_NAME[command].help in " ".join(capsys.readouterr().out.split())  # listed in `mae --help`


def test_package_exports_resolve():
    """The torch-backed names are exported lazily (PEP 562) and still import as before."""
    from mae_torch import MaskedAutoencoder, ViT, load_pretrained

    assert MaskedAutoencoder.__name__ == "MaskedAutoencoder" and ViT.__name__ == "ViT" and callable(load_pretrained)
    for name in mae_torch.__all__:
        assert getattr(mae_torch, name) is not None, name
    assert set(mae_torch.__all__) <= set(dir(mae_torch))
    assert mae_torch.ViT is ViT
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mae_torch.nope  # noqa: B018


def test_console_script_help():
    script = Path(sys.executable).with_name("mae")
    assert script.exists(), "the `mae` console script is not installed"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "pretrain" in proc.stdout and "smoke" in proc.stdout


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_resolves(preset, command, tmp_path, capsys):
    out = tmp_path / "not-created"
    capsys.readouterr()
    assert mae(command, "--preset", preset, "--print-config", "--out", out) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["command"] == command and {"model", "train", "run"} <= cfg.keys()
    data = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    for section, values in [("model", data["model"]), ("train", data[command]), ("run", data.get("run") or {})]:
        for key, value in values.items():
            assert cfg[section][key] == pytest.approx(value), f"{preset}: {section}.{key}"
    assert not out.exists()


def test_shipped_presets_include_smoke_and_the_paper_recipes():
    assert {"smoke", "cifar10-vit-tiny", "imagenet-vit-base"} <= set(preset_names())
