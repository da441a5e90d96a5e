"""Typed configuration: one source of truth for the model, a training stage, and a run.

Design decisions:
- Three dataclasses, each field with a one-line "why" (`doc`), which also becomes the CLI help text.
- Presets are plain YAML files in `presets/`: a `model` section, a `pretrain` and a `finetune` section
  (each a `TrainConfig`) and a `run` section. A run resolves, in order: dataclass defaults < preset <
  `--config FILE.yaml` < command-line flags. Unknown keys are errors, never silent defaults.
- The resolved config (`RunConfig.to_dict`) is saved in every run directory and reruns it with
  `--config config.yaml`.
- Derived values (learning rate from the base rate, accumulation steps) live here, in one place.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import MAEError

PRESET_DIR = Path(__file__).parent / "presets"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def doc(why: str, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field with its one-line explanation (shown by `--help`)."""
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"why": why}, **kwargs)
    return field(default=default, metadata={"why": why}, **kwargs)


@dataclass
class ModelConfig:
    img_size: int = doc("input side in pixels; images of another size are resized to it", 224)
    patch_size: int = doc("patch side in pixels; must divide img_size", 16)
    in_chans: int = doc("input channels (3 for RGB)", 3)
    embed_dim: int = doc("encoder width D", 768)
    depth: int = doc("encoder blocks", 12)
    num_heads: int = doc("encoder attention heads; must divide embed_dim", 12)
    mlp_ratio: float = doc("MLP hidden width / D", 4.0)
    pos_embed: str = doc("position embeddings: sincos (fixed, the paper) or learned", "sincos")
    decoder_embed_dim: int = doc("decoder width (pretraining only)", 512)
    decoder_depth: int = doc("decoder blocks (pretraining only)", 8)
    decoder_num_heads: int = doc("decoder attention heads", 16)
    mask_ratio: float = doc("fraction of patches removed in pretraining, in (0, 1)", 0.75)
    norm_pix_loss: bool = doc("predict per-patch normalized pixels (the paper's better target)", False)
    global_pool: str = doc("classifier pooling: cls token, or avg of patch tokens with fc_norm", "avg")
    drop_path: float = doc("classifier stochastic depth rate (fine-tuning)", 0.0)
    norm_eps: float = doc("LayerNorm epsilon; the official MAE's 1e-6, transformers' ViTMAE default 1e-12", 1e-6)
    qkv_bias: bool = doc("biases in the attention's query/key/value projection (the official MAE has them)", True)
    mean: tuple[float, ...] = doc("per-channel input mean used to normalize images", IMAGENET_MEAN)
    std: tuple[float, ...] = doc("per-channel input std used to normalize images", IMAGENET_STD)
    crop_pct: float = doc(
        "evaluation: images of another size are resized to img_size / crop_pct (shorter side), then centre-cropped",
        0.875,
    )

    def validate(self) -> None:
        check(0 < self.mask_ratio < 1, f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        check(
            self.patch_size > 0 and self.img_size % self.patch_size == 0,
            f"patch_size {self.patch_size} does not divide img_size {self.img_size}; "
            "choose a patch size that divides the image size",
        )
        for width, heads, name in [
            (self.embed_dim, self.num_heads, ""),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_"),
        ]:
            check(heads > 0 and width % heads == 0, f"{name}num_heads {heads} does not divide {name}embed_dim")
            check(
                self.pos_embed != "sincos" or width % 4 == 0,
                f"{name}embed_dim must be a multiple of 4 for sincos position embeddings",
            )
        check(self.pos_embed in ("sincos", "learned"), f"pos_embed must be sincos or learned, not {self.pos_embed}")
        check(self.global_pool in ("cls", "avg"), f"global_pool must be cls or avg, not {self.global_pool}")
        check(
            len(self.mean) == len(self.std) == self.in_chans,
            f"mean and std need {self.in_chans} values (one per input channel)",
        )
        check(0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}")
        check(0 < self.crop_pct <= 1, f"crop_pct must be in (0, 1], got {self.crop_pct}")
        check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")


@dataclass
class TrainConfig:
    epochs: int = doc("training epochs (the schedule's length)", 100)
    batch_size: int = doc("effective batch per optimizer step, reached by gradient accumulation", 256)
    device_batch_size: int = doc("batch per forward pass (what fits in memory); 0 = batch_size", 0)
    blr: float = doc("base learning rate; lr = blr * batch_size / 256 (the paper's scaling rule)", 1e-3)
    lr: float = doc("absolute learning rate; overrides blr when > 0", 0.0)
    min_lr: float = doc("learning rate at the end of the cosine schedule", 0.0)
    warmup_epochs: float = doc("linear warmup length in epochs, then cosine decay", 5.0)
    weight_decay: float = doc(
        "AdamW weight decay: not on biases, norms or positions, on the CLS and mask tokens only in pretraining "
        "(as the official code)",
        0.05,
    )
    betas: tuple[float, float] = doc("AdamW betas", (0.9, 0.999))
    label_smoothing: float = doc("label smoothing of the classification loss (fine-tuning)", 0.0)
    crop_scale: tuple[float, float] = doc(
        "random resized crop area range; 1 1 = off (paper pretraining: 0.2 1)", (1.0, 1.0)
    )
    hflip: bool = doc("random horizontal flips (the paper's pretraining uses them)", False)
    translate: int = doc("random shift of up to N pixels each way, zero-filled (CIFAR's pad-and-crop); 0 = off", 0)
    randaugment: int = doc("RandAugment ops per image, magnitude 9 of 10 (paper fine-tuning: 2); 0 = off", 0)
    reprob: float = doc("random erasing probability (paper fine-tuning: 0.25)", 0.0)
    mixup: float = doc("mixup alpha (paper fine-tuning: 0.8); 0 = off", 0.0)
    cutmix: float = doc("cutmix alpha (paper fine-tuning: 1.0); 0 = off", 0.0)
    layer_decay: float = doc("layer-wise lr decay (paper fine-tuning: 0.65 ViT-B, 0.75 L/H); 1 = off", 1.0)
    ema_decay: float = doc("keep an EMA of the weights, validated and saved instead; 0 = off", 0.0)
    tta_flip: bool = doc("validate on the mean of the logits of each image and its mirror image", False)
    monitor: str = doc("validation metric for best weights and early stopping: val_loss or val_acc", "val_loss")
    patience: int = doc("stop after this many epochs without improvement of monitor; 0 = never", 0)
    max_minutes: float = doc(
        "time bound: stop once this many minutes of training (resumed runs included) have passed, keeping the "
        "last finished epoch; 0 = none",
        0.0,
    )
    fit_to_time: bool = doc(
        "with max_minutes: once the epochs left no longer fit in the time left (at the median epoch's pace), "
        "run fewer, so the learning rate still anneals to min_lr by the bound (config.yaml records them)",
        False,
    )
    min_delta: float = doc("smallest change of monitor that counts as an improvement", 0.0)

    @property
    def micro_batch(self) -> int:
        return self.device_batch_size or self.batch_size

    @property
    def accum_steps(self) -> int:
        return self.batch_size // self.micro_batch

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr > 0 else self.blr * self.batch_size / 256

    def validate(self) -> None:
        check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        check(
            self.device_batch_size >= 0 and self.batch_size % self.micro_batch == 0,
            f"device_batch_size {self.device_batch_size} must divide batch_size {self.batch_size}",
        )
        check(self.peak_lr > 0, "the learning rate must be positive (set blr or lr)")
        check(self.monitor in ("val_loss", "val_acc"), f"monitor must be val_loss or val_acc, not {self.monitor}")
        check(self.patience >= 0, f"patience must be >= 0, got {self.patience}")
        check(self.max_minutes >= 0, f"max_minutes must be >= 0 (0 = no time bound), got {self.max_minutes}")
        check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}")
        check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(0 <= self.reprob <= 1 and self.randaugment >= 0, "reprob must be in [0, 1] and randaugment >= 0")
        check(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be >= 0")
        check(self.translate >= 0, f"translate must be >= 0 pixels, got {self.translate}")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, f"crop_scale must be two numbers 0 < min <= max <= 1, got {lo} {hi}")


@dataclass
class RunConfig:
    data: str = doc(
        "cifar10, cifar100, a folder of images (class subfolders give labels) or of tar shards, or hf:NAME[:SPLIT]",
        "cifar10",
    )
    data_root: str = doc("where torchvision datasets are downloaded; empty = ~/.cache/mae-torch/data", "")
    val_fraction: float = doc("share of training images held out for validation when there is no val/", 0.1)
    test_fraction: float = doc(
        "share of the training images set aside as a test split, never trained or validated on (for data without "
        "one; the same images whatever the seed; mae evaluate --test-fraction scores them); 0 = none",
        0.0,
    )
    seed: int = doc("random seed (weights, data order, masks)", 0)
    device: str = doc("auto, cpu, cuda, cuda:N or mps", "auto")
    precision: str = doc("auto, bf16, fp16 or fp32 (auto: bf16 where the hardware has it)", "auto")
    skip_bad_images: bool = doc("skip images that do not decode (with a warning and a count) instead of failing", False)
    num_workers: int = doc("data loading processes; 0 = load in the main process", 2)
    in_memory: bool = doc("hold small datasets as one uint8 tensor on the device (decoded once, cached)", True)
    attention: str = doc("sdpa, math, or auto: SDPA, but matmul + softmax on CPUs in bf16 (measured faster)", "auto")
    save_every: int = doc("also checkpoint every N optimizer steps, for resuming after a crash (0 = per epoch)", 0)
    skip_nonfinite: int = doc("steps with a non-finite loss to skip (their update is dropped) before stopping", 0)
    compile: bool = doc("torch.compile the model (measure first: it slowed the CPU step here)", False)
    grad_checkpointing: bool = doc(
        "recompute block activations in backward: less memory for large models, about a third more compute", False
    )
    knn_every: int = doc("pretraining on labeled data: k-NN accuracy of the encoder every N epochs (0 = off)", 0)
    recon_images: int = doc("validation images in the per-epoch reconstruction grid (pretraining)", 8)
    label_fraction: float = doc("fine-tuning: share of the labeled training images used, class-balanced", 1.0)
    labels_per_class: int = doc("fine-tuning: labeled images per class (overrides label_fraction; 0 = off)", 0)
    pretrained: str = doc(
        "fine-tuning: a pretraining run directory, weights in any format mae convert reads, or "
        "hf-hub:ORG/NAME[@REV]; empty = scratch",
        "",
    )


@dataclass
class Config:
    """Everything a run needs; saved as config.yaml in the run directory."""

    command: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        self.model.validate()
        self.train.validate()
        check(
            self.command != "pretrain" or self.train.monitor == "val_loss",
            "pretraining measures no accuracy: use --monitor val_loss",
        )
        check(0 <= self.run.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.run.val_fraction}")
        check(0 <= self.run.test_fraction < 1, f"test_fraction must be in [0, 1), got {self.run.test_fraction}")
        check(0 < self.run.label_fraction <= 1, f"label_fraction must be in (0, 1], got {self.run.label_fraction}")
        check(self.run.labels_per_class >= 0, f"labels_per_class must be >= 0, got {self.run.labels_per_class}")
        check(self.run.save_every >= 0, f"save_every must be >= 0, got {self.run.save_every}")
        check(self.run.skip_nonfinite >= 0, f"skip_nonfinite must be >= 0, got {self.run.skip_nonfinite}")
        check(
            self.run.attention in ("auto", "sdpa", "math"),
            f"attention must be auto, sdpa or math, not {self.run.attention}",
        )
        check(
            self.run.precision in ("auto", "bf16", "fp16", "fp32"),
            f"precision must be auto, bf16, fp16 or fp32, not {self.run.precision}",
        )
        return self

    def to_dict(self) -> dict:
        return {"command": self.command, **{k: to_plain(getattr(self, k)) for k in SECTIONS}}


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "run": RunConfig}


@dataclass
class SpeedrunConfig:
    """`mae speedrun`: how a budget of minutes becomes the epochs of each stage (speedrun.py)."""

    minutes: float = doc("the budget: minutes of training, pretraining and fine-tuning together", 60.0)
    pretrain_share: float = doc("share of the budget that MAE pretraining gets", 0.3)
    finetune_max_epochs: int = doc("fine-tuning runs at most this many epochs; the budget's rest pretrains", 100)
    few_labels_images: int = doc("fine-tuning on at most this many labeled images takes few_labels; 0 = never", 0)
    few_labels: dict = doc("fine-tuning settings that pay with few labels (train keys; drop_path from model)", {})
    cuda: dict = doc(
        "settings on CUDA GPUs, where small batches leave the device idle: {pretrain: {train keys}, finetune: {...}}",
        {},
    )
    pretrain_epochs: int = doc("pretraining epochs; 0 = sized to the budget by a short measurement", 0)
    finetune_epochs: int = doc("fine-tuning epochs; 0 = sized to the budget", 0)
    scratch_epochs: int = doc("epochs of the --scratch classifier; 0 = sized to the budget", 0)
    scratch: bool = doc("also train a classifier from scratch on the same budget, for comparison", False)
    pretrain_only: bool = doc("pretrain only (unlabeled data): no fine-tuning, no accuracy", False)

    def few_labels_split(self) -> tuple[dict, dict]:
        """few_labels as (model section values, fine-tuning section values)."""
        model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
        model = {k: v for k, v in self.few_labels.items() if k in model_keys}
        return model, {k: v for k, v in self.few_labels.items() if k not in model}

    def validate(self) -> None:
        check(self.minutes > 0, f"--minutes must be above 0, got {self.minutes:g}; e.g. --minutes 60")
        check(0 < self.pretrain_share < 1, f"pretrain_share must be in (0, 1), got {self.pretrain_share}")
        check(self.finetune_max_epochs >= 1, f"finetune_max_epochs must be at least 1, got {self.finetune_max_epochs}")
        for name in ("pretrain_epochs", "finetune_epochs", "scratch_epochs", "few_labels_images"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        model_values, train_values = self.few_labels_split()
        update(ModelConfig(), model_values, "few_labels")  # known keys only
        update(TrainConfig(), train_values, "few_labels")
        unknown = set(self.cuda) - {"pretrain", "finetune"}
        check(not unknown, f"the speedrun section's cuda settings have unknown stages {sorted(unknown)}")
        for stage, values in self.cuda.items():
            update(TrainConfig(), values, f"cuda.{stage} of the speedrun section")

    @property
    def sized(self) -> bool:
        """Whether the epochs are given (a rerun of a speedrun's config.yaml): no measurement needed."""
        return self.pretrain_epochs > 0 and (self.pretrain_only or self.finetune_epochs > 0)


SPEEDRUN_SECTIONS = {
    "model": ModelConfig,
    "pretrain": TrainConfig,
    "finetune": TrainConfig,
    "run": RunConfig,
    "speedrun": SpeedrunConfig,
}


@dataclass
class Speedrun:
    """A speedrun's whole config (saved as its config.yaml): one model and run section, both stages' training
    sections, and the budget's rules."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    speedrun: SpeedrunConfig = field(default_factory=SpeedrunConfig)

    def stage(self, command: str, train: TrainConfig | None = None) -> Config:
        """The Config of one stage (pretrain, finetune), as `mae pretrain/finetune` would run it."""
        section = train or getattr(self, command)
        parts = (self.model, section, self.run)
        return Config(command, *(from_dict(type(p), to_plain(p)) for p in parts)).validate()

    def validate(self) -> Speedrun:
        self.speedrun.validate()
        for command in ("pretrain", "finetune"):
            self.stage(command)
        return self

    def to_dict(self) -> dict:
        return {"command": "speedrun", **{k: to_plain(getattr(self, k)) for k in SPEEDRUN_SECTIONS}}


def resolve_speedrun(preset: str | None, config_file: str | None = None, overrides: dict | None = None) -> Speedrun:
    """A speedrun's config: defaults < preset < config file (a speedrun's config.yaml) < overrides."""
    cfg = Speedrun()
    layers = [(load_preset(preset), preset)] if preset else []
    if config_file:
        layers.append((read_yaml(Path(config_file)), config_file))
    layers.append((overrides or {}, "command-line options"))
    for sections, where in layers:
        unknown = set(sections) - {"command", *SPEEDRUN_SECTIONS}
        check(not unknown, f"unknown sections {sorted(unknown)} in {where}; known: {', '.join(SPEEDRUN_SECTIONS)}")
        for name in SPEEDRUN_SECTIONS:
            update(getattr(cfg, name), sections.get(name) or {}, f"{name} section of {where}")
    return cfg.validate()


def check(ok: bool, message: str) -> None:
    if not ok:
        raise MAEError(message)


def to_plain(obj) -> dict:
    """A dataclass as YAML-friendly plain data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(cls, name: str, value: Any) -> Any:
    """Check one value against its field's type: YAML gives ints for floats, lists for tuples."""
    kind = field_types(cls)[name]
    if typing.get_origin(kind) is tuple:
        check(isinstance(value, (list, tuple)), f"{name} must be a list, got {value!r}")
        return tuple(float(v) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and value is None:
        return ""
    check(
        isinstance(value, kind) and not (kind is int and isinstance(value, bool)),
        f"{name} must be {kind.__name__}, got {value!r}",
    )
    return value


def update(obj, values: dict, where: str) -> None:
    """Set fields of a config dataclass from a dict, rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in (values or {}).items():
        if key not in names:
            raise MAEError(f"unknown key {key!r} in {where}; known keys: {', '.join(sorted(names))}")
        setattr(obj, key, coerce(type(obj), key, value))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise MAEError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise MAEError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    check(isinstance(data, dict), f"config file {path} must hold a mapping of sections")
    return data


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    check(path.exists(), f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return read_yaml(path)


def resolve(command: str, preset: str | None, config_file: str | None = None, overrides: dict | None = None) -> Config:
    """Build the config of a `command` run: defaults < preset < config file < overrides (section -> dict)."""
    cfg = Config(command=command)
    layers = []
    if preset:
        data = load_preset(preset)
        unknown = set(data) - {"model", "pretrain", "finetune", "run", "speedrun"}
        check(not unknown, f"preset {preset} has unknown sections {sorted(unknown)}")
        layers.append(({"model": data.get("model"), "train": data.get(command), "run": data.get("run")}, preset))
    if config_file:
        data = read_yaml(Path(config_file))
        unknown = set(data) - {"command", *SECTIONS}
        check(not unknown, f"unknown sections {sorted(unknown)} in {config_file}; known: model, train, run")
        layers.append((data, config_file))
    layers.append((overrides or {}, "command-line options"))
    for sections, where in layers:
        for name in SECTIONS:
            update(getattr(cfg, name), sections.get(name) or {}, f"{name} section of {where}")
    return cfg.validate()


def from_dict(cls, values: dict):
    """Rebuild a config dataclass (e.g. a checkpoint's ModelConfig) from plain data."""
    obj = cls()
    update(obj, values, cls.__name__)
    return obj
