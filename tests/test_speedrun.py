"""`mae speedrun` and the time bound under it: the sizing logic, a whole speedrun on tiny data in seconds, a rerun
from its config.yaml, resume after a failure, unlabeled data, and the bad budgets.

The smoke preset on 16x16 PNGs of three colour classes (test_cli's images); everything on the CPU. Budgets are
seconds, so how many epochs a run gets depends on the machine: the tests check what the run did against what it
planned and wrote, never a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from test_cli import write_images

from mae_torch import engine, speedrun
from mae_torch.cli import main
from mae_torch.config import resolve, resolve_speedrun
from mae_torch.engine import epochs_that_fit
from mae_torch.errors import MAEError
from mae_torch.optim import lr_at
from mae_torch.speedrun import plan

CLASSES = ["red", "green", "blue"]
TINY = ["--preset", "smoke", "--device", "cpu", "--num-workers", "0"]


def mae(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speedrun-data")
    write_images(root / "train", CLASSES, per_class=40)
    write_images(root / "test", CLASSES, per_class=8, seed=1)
    return root


# ---------------------------------------------------------------- sizing


def test_plan_splits_the_budget_and_gives_the_rounding_to_pretraining():
    p = plan(600, share=0.3, max_ft=100, pre_s=10, ft_s=20)
    assert p.finetune_epochs == 21  # 70% of 600 s = 420 s = 21 epochs of 20 s
    assert p.pretrain_epochs == 18  # the remaining 180 s
    assert p.scratch_epochs == 30  # the whole budget
    assert p.pretrain_epochs * 10 + p.finetune_epochs * 20 <= 600


def test_plan_caps_fine_tuning_and_pretrains_with_the_rest():
    p = plan(600, share=0.3, max_ft=5, pre_s=10, ft_s=2)  # few labels: short fine-tuning epochs
    assert p.finetune_epochs == 5
    assert p.pretrain_epochs == 59  # (600 - 5 x 2) / 10


def test_plan_names_the_smallest_budget_that_fits():
    with pytest.raises(MAEError, match=r"too small: one epoch of each stage takes 0.50 minutes.*--minutes 0.5 or more"):
        plan(20, share=0.3, max_ft=100, pre_s=10, ft_s=20)
    assert plan(30, 0.3, 100, 10, 20).pretrain_epochs == 1  # exactly one of each fits
    assert plan(30, 0.3, 100, 10, 20, pretrain_only=True).pretrain_epochs == 3


def test_on_a_gpu_the_recipe_takes_its_larger_batches_once():
    spec = resolve_speedrun("cifar10-speedrun")
    speedrun.for_device(spec, torch.device("cpu"))
    assert (spec.pretrain.batch_size, spec.finetune.batch_size) == (256, 128)
    speedrun.for_device(spec, torch.device("cuda"))  # nothing runs on it: a config change
    assert (spec.pretrain.batch_size, spec.finetune.batch_size) == (1024, 512) and spec.speedrun.cuda == {}
    assert spec.pretrain.peak_lr == pytest.approx(2.4e-3) and spec.finetune.peak_lr == pytest.approx(1e-3)


def test_with_few_labels_the_recipe_takes_its_few_labels_settings_once():
    spec = resolve_speedrun("cifar10-speedrun")
    few, limit = dict(spec.speedrun.few_labels), spec.speedrun.few_labels_images
    assert few and limit  # the preset has them (docs/small-data.md, row F10-LD)
    speedrun.for_labels(spec, limit + 1)  # more labels: the recipe as it is
    assert spec.speedrun.few_labels == few and spec.finetune.layer_decay == 1.0
    speedrun.for_labels(spec, 4280)  # 10% of CIFAR-10's training labels
    assert spec.finetune.layer_decay == few["layer_decay"] != 1.0
    assert spec.speedrun.few_labels == {}  # config.yaml holds them in the sections, applied once


def test_few_labels_takes_model_keys_too_and_rejects_unknown_ones():
    spec = resolve_speedrun("cifar10-speedrun", None, {"speedrun": {"few_labels": {"drop_path": 0.2}}})
    speedrun.for_labels(spec, 100)
    assert spec.model.drop_path == 0.2 and spec.finetune.layer_decay == 1.0
    with pytest.raises(MAEError, match="unknown key 'layer_decy' in few_labels"):
        resolve_speedrun("cifar10-speedrun", None, {"speedrun": {"few_labels": {"layer_decy": 0.75}}})


@pytest.mark.parametrize("minutes", ["0", "-5"])
def test_a_budget_of_zero_or_less_is_a_one_line_error(minutes, capsys):
    assert mae("speedrun", "--minutes", minutes, *TINY) == 2
    assert "--minutes must be above 0" in capsys.readouterr().err


def test_a_budget_too_small_for_one_epoch_names_the_smallest(data, tmp_path, capsys):
    assert mae("speedrun", "--data", data, "--minutes", "0.0001", *TINY, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert "too small: one epoch of each stage takes" in err and "or more" in err and "\n" not in err


def test_unlabeled_data_is_an_error_unless_pretraining_only(tmp_path, capsys):
    flat = tmp_path / "flat"
    write_images(flat / "x", ["red"], per_class=40)
    for f in (flat / "x" / "red").iterdir():
        f.rename(flat / f.name)  # no class folders: unlabeled
    assert mae("speedrun", "--data", flat, "--minutes", "0.1", *TINY, "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "has no labels" in err and "add --pretrain-only" in err
    assert mae("speedrun", "--data", flat, "--minutes", "0.3", "--pretrain-only", *TINY, "--out", tmp_path / "b") == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert "top1" not in results and set(results["stages"]) == {"pretrain"}
    assert (tmp_path / "b" / "mae.safetensors").exists() and (tmp_path / "b" / "reconstructions.png").exists()


# ---------------------------------------------------------------- a whole speedrun


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speedrun") / "run"
    assert mae("speedrun", "--data", data, "--minutes", "0.5", "--scratch", *TINY, "--out", out) == 0
    return out


def test_a_speedrun_writes_its_results_pictures_and_half_precision_weights(run, data):
    r = json.loads((run / "results.json").read_text())
    assert 0 <= r["top1"] <= 1 and 0 <= r["scratch_top1"] <= 1
    assert r["n"] == 3 * 8 and r["split"].endswith("/test")
    assert set(r["stages"]) == {"pretrain", "finetune", "scratch"}
    for stage in r["stages"].values():
        assert 1 <= stage["epochs_done"] <= stage["epochs"] and stage["minutes"] > 0 and stage["pflop"] > 0
    assert r["budget_minutes"] == 0.5 and r["device"] == "cpu" and r["cpu_kind"] and r["machine"]
    assert r["measured"]["finetune"]["img_per_s"] > 0
    for name in ("results.md", "compare.png", "reconstructions.png", "pretrain/curves.png", "finetune/curves.png"):
        assert (run / name).exists(), name
    for name in ("model", "mae", "scratch"):
        with safe_open(str(run / f"{name}.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    assert "top-1" in (run / "results.md").read_text()


def test_the_stage_epochs_are_the_planned_ones_and_the_config_holds_them(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    state = json.loads((run / "state.json").read_text())
    sc = cfg["speedrun"]
    fitted = state["stages"]["pretrain"].get("fitted_epochs")  # a slow machine fits the schedule to the time
    assert sc["pretrain_epochs"] == (fitted or state["plan"]["pretrain_epochs"]) >= 1
    assert sc["finetune_epochs"] >= 1 and sc["scratch_epochs"] >= 1
    for stage, key in (("pretrain", "pretrain_epochs"), ("finetune", "finetune_epochs")):
        stage_cfg = yaml.safe_load((run / stage / "config.yaml").read_text())
        assert stage_cfg["train"]["epochs"] == sc[key]  # as planned, or as fitted to the time (and so adopted)
        assert stage_cfg["train"]["max_minutes"] > 0 and stage_cfg["train"]["fit_to_time"]  # bounded, fitted
    assert yaml.safe_load((run / "finetune" / "config.yaml").read_text())["run"]["pretrained"] == str(run / "pretrain")


def test_mae_evaluate_reads_the_speedrun_classifier(run, data, capsys):
    capsys.readouterr()
    assert mae("evaluate", "--checkpoint", run, "--data", data, "--device", "cpu", "--num-workers", "0", "--json") == 0
    top1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"]
    assert top1 == pytest.approx(json.loads((run / "results.json").read_text())["top1"], abs=1 / 24 + 1e-9)


def test_its_config_reruns_the_same_training_without_measuring(run, tmp_path):
    again = tmp_path / "again"
    assert mae("speedrun", "--config", run / "config.yaml", "--out", again) == 0
    state = json.loads((again / "state.json").read_text())
    assert state["sized"] and "measured" not in state
    first, second = (yaml.safe_load((r / "config.yaml").read_text())["speedrun"] for r in (run, again))
    for key in ("pretrain_epochs", "finetune_epochs", "scratch_epochs"):
        assert second[key] == first[key]
    for stage in ("pretrain", "finetune", "scratch"):
        done = len((again / stage / "metrics.jsonl").read_text().splitlines())
        assert done == yaml.safe_load((again / stage / "config.yaml").read_text())["train"]["epochs"]
        assert yaml.safe_load((again / stage / "config.yaml").read_text())["train"]["max_minutes"] == 0


def test_a_failed_speedrun_resumes_with_its_finished_stages_kept(data, tmp_path, monkeypatch, capsys):
    spec = resolve_speedrun("smoke", None, {"run": {"data": str(data), "device": "cpu", "num_workers": 0}})
    spec.speedrun.pretrain_epochs, spec.speedrun.finetune_epochs = 2, 2  # sized: no measurement
    config = tmp_path / "sized.yaml"
    config.write_text(yaml.safe_dump(spec.to_dict()))
    out = tmp_path / "run"
    real = speedrun.tasks.finetune

    def broken(*args, **kwargs):
        raise MAEError("simulated failure during fine-tuning")

    monkeypatch.setattr(speedrun.tasks, "finetune", broken)
    assert mae("speedrun", "--config", config, "--out", out) == 2
    before = (out / "pretrain" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(speedrun.tasks, "finetune", real)
    capsys.readouterr()
    assert mae("speedrun", "--resume", out) == 0
    assert "pretrain: done (2 epochs), kept" in capsys.readouterr().out
    assert (out / "pretrain" / "model.safetensors").stat().st_mtime_ns == before
    assert len((out / "finetune" / "metrics.jsonl").read_text().splitlines()) == 2
    assert "top1" in json.loads((out / "results.json").read_text())


def test_a_continued_run_counts_the_stopped_process_to_its_last_checkpoint(tmp_path):
    (tmp_path / "pretrain").mkdir()
    state = speedrun.State(tmp_path)
    state.data["wall_minutes"] = 0.0
    state.before = 5.0
    state.save()  # a process at 5 minutes (its start or a stage's end), then killed mid-stage ...
    t = (tmp_path / "state.json").stat().st_mtime
    ckpt = tmp_path / "pretrain" / "checkpoint.pt"
    ckpt.write_bytes(b"")
    os.utime(ckpt, (t + 600, t + 600))  # ... after writing a checkpoint 10 minutes later
    assert speedrun.State(tmp_path).wall_minutes == pytest.approx(15.0, abs=0.1)
    os.utime(ckpt, (t - 60, t - 60))  # a checkpoint older than the last save adds nothing
    assert speedrun.State(tmp_path).wall_minutes == pytest.approx(5.0, abs=0.1)


def test_without_a_test_split_training_images_are_held_out_from_both_stages(data, tmp_path):
    only_train = tmp_path / "d"
    only_train.symlink_to(data / "train")  # class folders, no test/
    out = tmp_path / "run"
    assert mae("speedrun", "--data", only_train, "--minutes", "0.4", *TINY, "--out", out) == 0
    r = json.loads((out / "results.json").read_text())
    assert "held out from both stages" in r["split"] and r["n"] == 3 * 4  # 10% of 40 per class
    cfg = yaml.safe_load((out / "finetune" / "config.yaml").read_text())
    assert cfg["run"]["test_fraction"] == 0.1
    args = ["--checkpoint", out, "--data", only_train, "--device", "cpu", "--num-workers", "0", "--json"]
    result = subprocess.run([sys.executable, "-m", "mae_torch", "evaluate", *args, "--test-fraction", "0.1"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == r["n"]


# ---------------------------------------------------------------- the time bound


@pytest.fixture
def fake_clock(monkeypatch):
    """engine's perf_counter advancing one second per call: a run's time is counted in calls, not measured."""
    now = [0.0]

    def tick():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(engine.time, "perf_counter", tick)
    return now


def test_the_time_bound_keeps_the_last_finished_epoch(data, tmp_path, fake_clock, capsys):
    from mae_torch import tasks

    cfg = resolve("pretrain", "smoke", None, {"run": {"data": str(data / "train"), "device": "cpu", "num_workers": 0}})
    cfg.train.epochs, cfg.train.max_minutes = 50, 1.0  # 60 fake seconds: a few epochs, not 50
    out = tmp_path / "bounded"
    metrics = tasks.pretrain(cfg, out)
    done = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["stopped"] == "time bound" and 1 <= len(done) < 50
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] + 1 == len(done) and ckpt["step"] == done[-1]["step"]  # the last finished epoch
    assert ckpt["seconds"] + ckpt["epoch_seconds"] > 60  # the time spent, and the epoch that would not fit
    assert len(ckpt["epoch_times"]) == len(done)  # each epoch's time: the pace a resumed run fits with
    assert metrics["seconds"] >= ckpt["seconds"] > 0
    assert "time bound: stopped" in capsys.readouterr().out
    again = tasks.pretrain(cfg, out, resume=True)  # the bound counts the earlier time: nothing more to do
    assert again["stopped"] == "time bound"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(done)


def test_epochs_that_fit():
    assert epochs_that_fit(50, done=2, left_s=100, epoch_times=[10, 10]) == 12  # 10 more fit
    assert epochs_that_fit(50, done=2, left_s=1000, epoch_times=[10, 10]) == 50  # never more than planned
    assert epochs_that_fit(50, done=2, left_s=5, epoch_times=[10, 10]) == 2  # never fewer than done
    assert epochs_that_fit(50, done=0, left_s=-5, epoch_times=[10]) == 1 and epochs_that_fit(50, 3, 5, []) == 50
    # at the median pace: one epoch slowed by another job does not cut the schedule as if all were that slow
    assert epochs_that_fit(50, done=5, left_s=450, epoch_times=[10, 10, 10, 10, 60]) == 50
    assert epochs_that_fit(50, done=5, left_s=450, epoch_times=[10, 60, 60, 60, 60]) == 12  # a lasting slowdown


def test_fit_to_time_shortens_the_schedule_so_the_lr_anneals_by_the_bound(data, tmp_path, fake_clock, capsys):
    from mae_torch import tasks

    cfg = resolve("pretrain", "smoke", None, {"run": {"data": str(data / "train"), "device": "cpu", "num_workers": 0}})
    cfg.train.epochs, cfg.train.max_minutes, cfg.train.fit_to_time = 50, 3.0, True  # 180 fake seconds
    cfg.train.warmup_epochs, cfg.train.min_lr = 0, 0.0
    out = tmp_path / "fitted"
    metrics = tasks.pretrain(cfg, out)
    done = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fitted = yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"]
    assert 2 <= fitted < 50 and metrics["fitted_epochs"] == fitted
    assert len(done) == fitted  # its fitted epochs, no more: they fit in the bound
    assert "fit to time:" in capsys.readouterr().out
    # the learning rate followed the shorter schedule: annealed, where 50 epochs would still be near the peak
    last, steps = done[-1], done[0]["step"]
    assert last["lr"] < 0.5 * lr_at(last["step"] - 1, 50 * steps, 0, cfg.train.peak_lr, 0.0)


def test_a_fitted_schedule_ends_at_its_fitted_epochs(data, tmp_path, monkeypatch):
    """Once fit_to_time shortens the schedule, the run trains those epochs and no more (time to spare or not)."""
    from mae_torch import tasks

    monkeypatch.setattr(engine, "epochs_that_fit", lambda epochs, done, left_s, epoch_s: 3)
    cfg = resolve("pretrain", "smoke", None, {"run": {"data": str(data / "train"), "device": "cpu", "num_workers": 0}})
    cfg.train.epochs, cfg.train.max_minutes, cfg.train.fit_to_time = 6, 600.0, True
    metrics = tasks.pretrain(cfg, tmp_path / "run")
    assert metrics["fitted_epochs"] == 3 and metrics["epoch"] == 3 and "stopped" not in metrics
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
