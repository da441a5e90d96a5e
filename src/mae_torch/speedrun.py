"""`mae speedrun`: MAE pretraining, fine-tuning from its encoder and top-1 on held-out images, in one command
sized to a budget of minutes on the device at hand.

Design decisions:
- The recipe is a preset with a `speedrun` section (plain data, `config.SpeedrunConfig`): the budget's share
  for pretraining, a cap on the fine-tuning epochs (the rest of the budget pretrains), settings that pay with
  few labels, and larger batches on CUDA GPUs. docs/small-data.md has the runs behind each value.
- The epochs come from a measurement (`measure`): a few training steps of each stage, with its augmentation,
  and a few validation batches, on the device at hand. `plan` turns them and the budget into epochs (a pure
  function). Both are printed, and the epochs written to RUN/config.yaml, so `--config RUN/config.yaml`
  reruns the same training without measuring (and without time bounds: the epochs are the recipe then).
- Each stage is an ordinary run directory (RUN/pretrain, RUN/finetune, RUN/scratch) trained by tasks.py with
  a time bound (`max_minutes`): pretraining its share, fine-tuning what the budget has left. A stage whose
  epochs run slower than measured (a busy or slower machine, a CPU that slows under sustained load) shortens
  its schedule as soon as the epochs left no longer fit (`fit_to_time`), so its learning rate still anneals to
  the end; once pretraining is done, the fine-tuning epochs are re-planned with how far its epochs ran from
  the measurement. A stage stopped at its bound keeps its last finished epoch, and the results say so.
- RUN/state.json records the plan and each stage finished; `--resume RUN` continues the stage that was running
  from its checkpoint and then the ones after it.
- Accuracy is measured once, with the last epoch's weights, on the data's test split (CIFAR's, D/test) or,
  where there is none, on training images that both stages held out (`test_fraction`), as the output says.
- The budget counts the stages' training (their epochs, validation and checkpoints: the engine's clock);
  start-up, the measurement and the final evaluation come on top and are reported as the wall time.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from . import tasks
from .bench import machine, make_eval_step, make_step, time_it
from .config import Speedrun, TrainConfig, resolve, update
from .convert import convert
from .data import build_datasets, build_eval_dataset, has_test_split, label_subset
from .errors import MAEError
from .models import build_mae, load_weights, model_config_from
from .plots import compare_runs, read_metrics, save_reconstructions
from .runtime import (
    CPU_FEATURES,
    Normalizer,
    atomic_write,
    cpu_features,
    keep_freed_memory,
    load_state,
    resolve_device,
    resolve_precision,
)
from .viz import caption, reconstruction_grid

DEFAULT_TEST_FRACTION = 0.1  # held out from both stages when the data has no test split
EPOCH_OVERHEAD_S = 2.0  # per epoch beyond the timed steps: checkpoint, weights, curves, reconstructions
STAGES = ("pretrain", "finetune", "scratch")


@dataclass
class Plan:
    pretrain_epochs: int
    finetune_epochs: int
    scratch_epochs: int
    pretrain_epoch_s: float  # predicted seconds of one epoch, validation included
    finetune_epoch_s: float  # the scratch classifier's epochs cost the same


def epoch_seconds(n_train: int, n_val: int, speed: dict) -> float:
    """Predicted seconds of one epoch from the measured img/s of training and of validation."""
    return n_train / speed["img_per_s"] + n_val / speed["eval_img_per_s"] + EPOCH_OVERHEAD_S


def plan(budget_s: float, share: float, max_ft: int, pre_s: float, ft_s: float, pretrain_only=False) -> Plan:
    """The epochs of each stage within `budget_s` seconds, from the predicted seconds of an epoch of each:
    fine-tuning gets the budget's (1 - share), at most `max_ft` epochs; pretraining all that is left (so the
    rounding's leftovers go to it); a scratch classifier the whole budget."""
    smallest = pre_s + (0 if pretrain_only else ft_s)
    if budget_s < smallest:
        need = math.ceil(smallest / 60 * 10) / 10
        what = "one pretraining epoch takes" if pretrain_only else "one epoch of each stage takes"
        raise MAEError(
            f"--minutes {budget_s / 60:g} is too small: {what} {smallest / 60:.2f} minutes on this device; "
            f"use --minutes {need:g} or more"
        )
    if pretrain_only:
        return Plan(int(budget_s // pre_s), 0, 0, pre_s, ft_s)
    ft = max(1, min(max_ft, int(budget_s * (1 - share) // ft_s)))
    pre = max(1, int((budget_s - ft * ft_s) // pre_s))
    return Plan(pre, ft, max(1, int(budget_s // ft_s)), pre_s, ft_s)


def median_seconds(fn, device: torch.device, steps: int, warmup: int) -> float:
    """The median time of single calls after warm-up: a call slowed by another process on the machine (a
    shared CPU's threads) moves it less than it moves a mean."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        times.append(time_it(fn, device, 1, 0))
    return statistics.median(times)


def measure(spec: Speedrun, device: torch.device, precision: str, steps: int = 7, warmup: int = 2) -> dict:
    """Per stage: img/s of its training step (with its augmentation) and of validation, and GFLOP per
    training image (PyTorch's FLOP counter, attention through the math kernel so its products are counted)."""
    if device.type == "cpu":
        keep_freed_memory()  # as training does
    out = {}
    for stage in ("pretrain",) if spec.speedrun.pretrain_only else ("pretrain", "finetune"):
        cfg = spec.stage(stage)
        b = cfg.train.micro_batch
        step, _ = make_step(stage, cfg, b, device, precision, attention=cfg.run.attention, augmented=True)
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            step()
        seconds = median_seconds(step, device, steps, warmup)
        eval_seconds = median_seconds(make_eval_step(stage, cfg, b, device, precision), device, steps, 1)
        gflop = counter.get_total_flops() / b / 1e9
        out[stage] = {"img_per_s": b / seconds, "eval_img_per_s": b / eval_seconds, "gflop_per_img": gflop}
    return out


def for_device(spec: Speedrun, device: torch.device) -> None:
    """The speedrun section's cuda settings into the stages on a CUDA GPU; config.yaml then holds them, so a
    rerun of it trains the same (and applies them once)."""
    if device.type == "cuda":
        for stage, values in spec.speedrun.cuda.items():
            update(getattr(spec, stage), values, f"cuda.{stage} of the speedrun section")
        spec.speedrun.cuda = {}


def for_labels(spec: Speedrun, labeled: int) -> None:
    """The speedrun section's few_labels settings (model or fine-tuning keys) into the model and fine-tuning
    sections when fine-tuning has at most few_labels_images labeled images; applied once, as for_device."""
    sc = spec.speedrun
    if sc.few_labels and sc.few_labels_images and labeled <= sc.few_labels_images:
        model_values, train_values = sc.few_labels_split()
        update(spec.model, model_values, "few_labels")
        update(spec.finetune, train_values, "few_labels")
        print(f"{labeled} labeled images, at most {sc.few_labels_images}: fine-tuning takes {sc.few_labels}")
        sc.few_labels = {}


def split_sizes(spec: Speedrun) -> dict:
    """Training and validation images of each stage; a speedrun that fine-tunes needs labels."""
    cfg = spec.stage("pretrain")
    train, val, classes = build_datasets(**tasks.data_args(cfg))
    sizes = {"pretrain": (len(train), len(val)), "classes": classes}
    if spec.speedrun.pretrain_only:
        return sizes
    if classes is None:
        raise MAEError(
            f"{spec.run.data} has no labels (no <class>/ subfolders): a speedrun fine-tunes and measures accuracy; "
            "add --pretrain-only to pretrain only"
        )
    r = spec.run
    labeled = label_subset(train, r.label_fraction, r.labels_per_class, r.seed)
    sizes["finetune"] = (len(labeled), len(val))
    return sizes


def finetune_section(spec: Speedrun, epochs: int) -> TrainConfig:
    """The fine-tuning section for `epochs` epochs."""
    tc = TrainConfig(**asdict(spec.finetune))
    tc.epochs = epochs
    return tc


class State:
    """RUN/state.json: the measurement, the plan and each finished stage, written atomically."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}
        self.t0 = time.perf_counter()
        self.before = self.data.get("wall_minutes", 0.0) + self.unsaved_minutes(run_dir)  # earlier processes

    def unsaved_minutes(self, run_dir: Path) -> float:
        """A process stopped mid-stage saved its wall time last when it started (or finished a stage): its
        minutes from then to the newest stage checkpoint it wrote."""
        if not self.path.exists():
            return 0.0
        newest = max((p.stat().st_mtime for p in run_dir.glob("*/checkpoint.pt")), default=0.0)
        return max(0.0, newest - self.path.stat().st_mtime) / 60

    @property
    def wall_minutes(self) -> float:
        """Minutes from the speedrun's start to now, resumed processes added up."""
        return self.before + (time.perf_counter() - self.t0) / 60

    def save(self) -> None:
        self.data["wall_minutes"] = self.wall_minutes
        text = json.dumps(self.data, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def start(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    if resume:
        if not (run_dir / "state.json").exists():
            raise MAEError(f"cannot resume {run_dir}: no state.json there (is it a speedrun directory?)")
        return run_dir
    return tasks.start_run(run_dir, False, overwrite)


def speedrun(spec: Speedrun, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the speedrun into run_dir (see the module's docstring); returns results.json's content."""
    run_dir = start(Path(run_dir), resume, overwrite)
    state, sc = State(run_dir), spec.speedrun
    if "plan" in state.data:  # a continued run: its wall time so far, saved now (see State.unsaved_minutes)
        state.save()
    if not (sc.pretrain_only or has_test_split(spec.run.data) or spec.run.test_fraction):
        spec.run.test_fraction = DEFAULT_TEST_FRACTION
    sizes = split_sizes(spec)
    device = resolve_device(spec.run.device)
    precision = resolve_precision(spec.run.precision, device)
    if "plan" not in state.data:
        for_device(spec, device)
        if not sc.pretrain_only:
            for_labels(spec, sizes["finetune"][0])
        state.data.update(sized=sc.sized, device=str(device), machine=machine(device), precision=precision)
        if not sc.sized:
            print(f"measuring the training steps on {device} ({precision}) ...", flush=True)
            speed = state.data["measured"] = measure(spec, device, precision)
            pre_s = epoch_seconds(*sizes["pretrain"], speed["pretrain"])
            ft_s = epoch_seconds(*sizes["finetune"], speed["finetune"]) if "finetune" in speed else 0.0
            p = plan(sc.minutes * 60, sc.pretrain_share, sc.finetune_max_epochs, pre_s, ft_s, sc.pretrain_only)
            sc.pretrain_epochs, sc.finetune_epochs, sc.scratch_epochs = p.pretrain_epochs, p.finetune_epochs, 0
            sc.scratch_epochs = p.scratch_epochs if sc.scratch else 0
            state.data["plan"] = asdict(p)
        else:
            state.data["plan"] = {"pretrain_epochs": sc.pretrain_epochs, "finetune_epochs": sc.finetune_epochs}
        write_config(spec, run_dir)
        state.save()
    announce(spec, sizes, state.data)
    results = {}
    pre_dir = run_dir / "pretrain"
    run_stage(state, "pretrain", spec.stage("pretrain", pretrain_section(spec, state)), pre_dir, tasks.pretrain)
    adopt_fitted(spec, state, run_dir)
    if not sc.pretrain_only:
        replan(spec, state, run_dir)
        cfg = spec.stage("finetune", stage_bound(finetune_section(spec, sc.finetune_epochs), spec, state))
        cfg.run.pretrained = str(pre_dir)
        run_stage(state, "finetune", cfg, run_dir / "finetune", tasks.finetune)
        if sc.scratch:
            tc = finetune_section(spec, sc.scratch_epochs or sc.finetune_epochs)
            tc.layer_decay, tc.max_minutes = 1.0, sc.minutes if not state.data["sized"] else 0.0
            tc.fit_to_time = not state.data["sized"]
            run_stage(state, "scratch", spec.stage("finetune", tc), run_dir / "scratch", tasks.finetune)
        adopt_fitted(spec, state, run_dir)
        results = evaluate(spec, state, run_dir, device)
    results.update(report_stages(spec, state, run_dir))
    finish(spec, results, run_dir)
    return results


def write_config(spec: Speedrun, run_dir: Path) -> None:
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))


def pretrain_section(spec: Speedrun, state: State) -> TrainConfig:
    """Pretraining's epochs, bounded by the budget less the planned fine-tuning (when the plan was measured)."""
    tc = TrainConfig(**asdict(spec.pretrain))
    tc.epochs = spec.speedrun.pretrain_epochs
    p = state.data["plan"]
    if not state.data["sized"]:
        tc.max_minutes = (spec.speedrun.minutes * 60 - p["finetune_epochs"] * p["finetune_epoch_s"]) / 60
        tc.fit_to_time = True
    return tc


def stage_bound(tc: TrainConfig, spec: Speedrun, state: State) -> TrainConfig:
    """Fine-tuning is bounded by what the budget has left after pretraining (when the plan was measured)."""
    if not state.data["sized"]:
        tc.max_minutes = max(spec.speedrun.minutes - state.data["stages"]["pretrain"]["minutes"], 0.1)
        tc.fit_to_time = True
    return tc


def replan(spec: Speedrun, state: State, run_dir: Path) -> None:
    """Once pretraining is done: fine-tuning's epochs for the budget left, its predicted epoch scaled by how
    long pretraining's epochs took against their prediction (clamped to 0.8-1.5x); config.yaml follows."""
    sc, p, pre = spec.speedrun, state.data["plan"], state.data["stages"]["pretrain"]
    if state.data["sized"] or "replanned" in state.data:
        return
    ratio = min(max(pre["minutes"] * 60 / max(pre["epochs_done"], 1) / p["pretrain_epoch_s"], 0.8), 1.5)
    left = sc.minutes * 60 - pre["minutes"] * 60
    epochs = max(1, min(sc.finetune_max_epochs, int(left // (p["finetune_epoch_s"] * ratio))))
    if epochs != sc.finetune_epochs:
        print(f"fine-tuning: {epochs} epochs, not {sc.finetune_epochs} (pretraining took {ratio:.2f}x its prediction)")
    sc.finetune_epochs = epochs
    state.data["replanned"] = {"ratio": ratio, "finetune_epochs": epochs}
    write_config(spec, run_dir)
    state.save()


def adopt_fitted(spec: Speedrun, state: State, run_dir: Path) -> None:
    """The epochs of stages that fitted their schedule to the time (fit_to_time) into config.yaml, so that
    `--config` reruns the training that ran."""
    sc, changed = spec.speedrun, False
    for name, info in state.data["stages"].items():
        key, fitted = f"{name}_epochs", info.get("fitted_epochs")
        if fitted and getattr(sc, key) != fitted:
            setattr(sc, key, fitted)
            changed = True
    if changed:
        write_config(spec, run_dir)


def run_stage(state: State, name: str, cfg, stage_dir: Path, job) -> None:
    """Train one stage unless state.json has it done; a stage with a checkpoint continues from it."""
    if name in state.data["stages"]:
        print(f"{name}: done ({state.data['stages'][name]['epochs_done']} epochs), kept")
        return
    resume = (stage_dir / "checkpoint.pt").exists()
    if resume:  # the stage's own config: its epochs and time bound as it started
        cfg = resolve(cfg.command, None, str(stage_dir / "config.yaml"))
    planned = cfg.train.epochs  # training may fit it to the time (fit_to_time)
    metrics = job(cfg, stage_dir, resume=resume, overwrite=True)
    state.data["stages"][name] = {
        "epochs": planned,
        "epochs_done": len(read_metrics(stage_dir)),
        "stopped": metrics.get("stopped"),
        "minutes": metrics.get("seconds", 0.0) / 60,
        **({"fitted_epochs": metrics["fitted_epochs"]} if "fitted_epochs" in metrics else {}),
    }
    state.save()


def announce(spec: Speedrun, sizes: dict, s: dict) -> None:
    sc, p = spec.speedrun, s["plan"]
    print(f"speedrun on {s['machine']}, {s['precision']}: budget {sc.minutes:g} minutes of training")
    for stage, speed in s.get("measured", {}).items():
        print(
            f"  measured {stage}: {speed['img_per_s']:.0f} img/s training (with its augmentation), "
            f"{speed['eval_img_per_s']:.0f} img/s validation, {speed['gflop_per_img']:.2f} GFLOP/img"
        )
    n_pre = sizes["pretrain"]
    line = f"  plan: pretraining {p['pretrain_epochs']} epochs of {n_pre[0]} images"
    if "pretrain_epoch_s" in p:
        line += f" ({p['pretrain_epoch_s']:.0f} s each)"
    if not sc.pretrain_only:
        n_ft = sizes["finetune"]
        line += f", fine-tuning {p['finetune_epochs']} epochs of {n_ft[0]} labeled images"
        line += f" ({p['finetune_epoch_s']:.0f} s each)" if "finetune_epoch_s" in p else ""
        line += f", from scratch {sc.scratch_epochs}" if sc.scratch else ""
    print(line + f"; {n_pre[1]} validation images")
    if not sc.pretrain_only:
        print(f"  top-1 is measured on {test_split_name(spec)}")


def test_split_name(spec: Speedrun) -> str:
    r = spec.run
    if r.test_fraction:
        return f"{r.test_fraction:.0%} of {r.data}'s training images, held out from both stages (it has no test split)"
    return f"{r.data}'s test split" if r.data.lower().startswith("cifar") else f"{r.data}/test"


def evaluate(spec: Speedrun, state: State, run_dir: Path, device: torch.device) -> dict:
    """Top-1 of the fine-tuned classifier (and the scratch one) on the test split, last epoch's weights."""
    r, tta = spec.run, spec.finetune.tta_flip
    out = {}
    for stage in ("finetune", "scratch") if spec.speedrun.scratch else ("finetune",):
        result = tasks.evaluate_checkpoint(
            str(run_dir / stage / "model.safetensors"),
            r.data,
            r.data_root,
            str(device),
            r.precision,
            num_workers=r.num_workers,
            tta_flip=tta,
            test_fraction=r.test_fraction,
        )
        key = "top1" if stage == "finetune" else "scratch_top1"
        out[key], out["n"] = result["top1"], result["n"]
    out.update(split=test_split_name(spec), tta_flip=tta)
    return out


def report_stages(spec: Speedrun, state: State, run_dir: Path) -> dict:
    """results.json's stage entries: epochs planned and done, minutes, median img/s, PFLOP."""
    s = state.data
    gflop = {k: v["gflop_per_img"] for k, v in s.get("measured", {}).items()}
    stages = {}
    for name, info in s["stages"].items():
        metrics = read_metrics(run_dir / name)
        cfg = yaml.safe_load((run_dir / name / "config.yaml").read_text())
        images = metrics[-1]["step"] * cfg["train"]["batch_size"] if metrics else 0
        per_img = gflop.get("pretrain" if name == "pretrain" else "finetune")
        stages[name] = {
            **info,
            "img_per_s": statistics.median(m["img_per_s"] for m in metrics) if metrics else 0.0,
            "pflop": images * per_img / 1e6 if per_img else None,
        }
    features = cpu_features()
    return {
        "budget_minutes": spec.speedrun.minutes,
        "stages": stages,
        "train_minutes": sum(v["minutes"] for k, v in stages.items() if k != "scratch"),
        "wall_minutes": state.wall_minutes,
        "device": s["device"],
        "machine": s["machine"],
        "cpu_kind": next((f for f in reversed(CPU_FEATURES) if f in features), "none"),
        "precision": s["precision"],
        "measured": s.get("measured"),
    }


def finish(spec: Speedrun, results: dict, run_dir: Path) -> None:
    """results.json, results.md, the pictures and the final weights in half precision."""
    for stage, name in (("pretrain", "mae"), ("finetune", "model"), ("scratch", "scratch")):
        if (run_dir / stage / "model.safetensors").exists():
            convert(
                run_dir / stage / "model.safetensors", "ours", run_dir / f"{name}.safetensors", "ours", dtype="float16"
            )
    runs = [str(run_dir / s) for s in ("scratch", "finetune") if (run_dir / s / "metrics.jsonl").exists()]
    if runs:
        compare_runs(runs, run_dir / "compare.png")
    reconstructions(spec, run_dir / "mae.safetensors", run_dir / "reconstructions.png")
    text = json.dumps(results, indent=1)
    atomic_write(run_dir / "results.json", lambda tmp: Path(tmp).write_text(text))
    md = results_md(results)
    atomic_write(run_dir / "results.md", lambda tmp: Path(tmp).write_text(md))
    print(md)


def reconstructions(spec: Speedrun, weights: Path, out: Path, n: int = 10) -> None:
    """The pretrained MAE on held-out images (test split, else validation), spread over the split."""
    state, meta = load_weights(weights)
    m = model_config_from(meta)
    model = build_mae(m)
    load_state(model, {k: v.float() for k, v in state.items()}, str(weights))
    r = spec.run
    try:
        ds, _ = build_eval_dataset(
            r.data, data_root=r.data_root or None, img_size=m.img_size, test_fraction=r.test_fraction
        )
    except MAEError:  # unlabeled data without a test split: validation images
        ds = build_datasets(**tasks.data_args(spec.stage("pretrain")))[1]
    picks = torch.linspace(0, len(ds) - 1, min(n, len(ds))).round().long().tolist()
    images = Normalizer(m.mean, m.std, torch.device("cpu"))(torch.stack([ds[i][0] for i in picks]))
    noise = torch.rand(len(picks), model.patch_embed.num_patches, generator=torch.Generator().manual_seed(r.seed))
    grid = reconstruction_grid(model, images, noise, m.mean, m.std)
    save_reconstructions(grid, out, caption(model, prefix="held-out images, after pretraining: "))


def results_md(r: dict) -> str:
    lines = [
        "# mae speedrun",
        "",
        f"Budget {r['budget_minutes']:g} minutes of training on {r['machine']} ({r['precision']}); "
        f"{r['train_minutes']:.1f} minutes trained, {r['wall_minutes']:.1f} minutes start to end.",
        "",
    ]
    if "top1" in r:
        tta = " (flip test-time augmentation)" if r["tta_flip"] else ""
        lines += [f"**top-1 {100 * r['top1']:.2f}%** on {r['split']}, {r['n']} images{tta}, last epoch's weights."]
        if "scratch_top1" in r:
            lines += [f"From scratch on the same budget: {100 * r['scratch_top1']:.2f}%."]
        lines += [""]
    lines += [
        "| stage | epochs done / planned | minutes | img/s (median) | PFLOP | stopped |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in r["stages"].items():
        pflop = f"{s['pflop']:.3f}" if s["pflop"] is not None else "-"
        stopped = s["stopped"] or (f"fitted to {s['fitted_epochs']} epochs" if s.get("fitted_epochs") else "no")
        lines.append(
            f"| {name} | {s['epochs_done']} / {s['epochs']} | {s['minutes']:.1f} | {s['img_per_s']:.0f} | {pflop} | "
            f"{stopped} |"
        )
    return "\n".join(lines) + "\n"
