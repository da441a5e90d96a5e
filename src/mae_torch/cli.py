"""The `mae` command line: pretrain, finetune, evaluate, reconstruct, compare, convert, push, embed, knn, linprobe,
bench.

Design decisions:
- One table, `COMMANDS`, lists every subcommand: its name, its one-line help, a function that adds its
  arguments and a function that runs it (returning the exit status). `build_parser` and `run` only walk
  that table, so adding a command is one row and two small functions, and no `if command == ...` chain.
- Two modules: this one holds the entry point, the table and the training/evaluation commands (pretrain,
  finetune, evaluate, reconstruct, compare); cli_tools.py holds the commands that work on weights and
  frozen features (convert, push, embed, knn, linprobe) and bench. cli_tools never imports this module.
- `mae --help` and `mae COMMAND --help` load no torch (nor timm, torchvision, tensorboard, matplotlib,
  numpy), which take seconds to import: these modules import only the standard library, yaml (config.py)
  and errors.py at the top. Each handler imports the heavy modules it needs inside itself, once the
  arguments are valid; handlers are the one place in this package where function-level imports are
  deliberate. The package's `__init__` exports its torch-backed names lazily for the same reason.
- Every config field is a flag (`--mask-ratio`, `--batch-size`, ...), generated from the dataclasses in
  config.py so the help text and the config can never disagree. Flags default to "not given", so only what
  you type overrides the preset and the `--config` file.
- A run directory is never overwritten silently: an existing non-empty `--out` needs `--overwrite`, and
  `--resume RUN_DIR` continues a run from its own config.yaml and checkpoint.pt; `--resume auto --out RUN_DIR`
  continues it when it has a checkpoint and starts it otherwise, so that a launcher's restarts (torchrun
  `--max-restarts`, SLURM requeues) rerun one command line.
- User errors (`MAEError`) print one line `mae: error: ...` and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml

from . import cli_tools as tools
from .config import SECTIONS, preset_names, resolve
from .errors import MAEError

DEFAULT_PRESET = "cifar10-vit-tiny"


# ---------------------------------------------------------------- pretrain, finetune


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options (default: the preset's value, else the one shown)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, default = hints[f.name], getattr(cls(), f.name)
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict = {
                "default": None,
                "dest": f"{section}.{f.name}",
                "help": f"{f.metadata['why']} (default: {default})",
            }
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(kind) is tuple:
                kwargs.update(type=float, nargs=len(default) if f.name == "betas" else "+", metavar="X")
            else:
                kwargs.update(type=kind, metavar=kind.__name__.upper())
            group.add_argument(flag, **kwargs)


def overrides(args: argparse.Namespace) -> dict:
    out: dict = {name: {} for name in SECTIONS}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            out[section][name] = value
    return out


def add_train_args(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument(
        "--preset", metavar="NAME", help=f"a recipe: {', '.join(preset_names())} (default: {DEFAULT_PRESET})"
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="a YAML file with model/train/run sections, e.g. a run's config.yaml; applied over the preset",
    )
    p.add_argument("--out", metavar="RUN_DIR", help=f"run directory (default: runs/{command}-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out run directory")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run from its last checkpoint; auto: continue --out if it has one, else start it",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_flags(p)


def resume_target(args: argparse.Namespace, marker: str) -> tuple[Path | None, bool]:
    """(run directory, whether to continue it): --resume RUN_DIR continues that run; --resume auto continues
    --out where it holds `marker` (its checkpoint) and starts there otherwise, replacing what an attempt left
    before its first checkpoint; (None, False) without --resume."""
    if args.resume != "auto":
        return (Path(args.resume), True) if args.resume else (None, False)
    if not args.out:
        raise MAEError("--resume auto needs --out RUN_DIR: the run to continue, or to start there")
    run_dir = Path(args.out)
    if not (run_dir / marker).exists() and (run_dir / "config.yaml").exists():
        args.overwrite = True  # an earlier attempt that died before its first checkpoint
    return run_dir, (run_dir / marker).exists()


def prepare_run(args: argparse.Namespace):
    """The resolved config, the run directory and whether to continue it."""
    run_dir, resume = resume_target(args, "checkpoint.pt")
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise MAEError(f"cannot resume {run_dir}: no config.yaml and checkpoint.pt there")
        return resolve(args.command, None, str(run_dir / "config.yaml"), overrides(args)), run_dir, True
    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    cfg = resolve(args.command, preset, args.config, overrides(args))
    return cfg, run_dir or Path(args.out or f"runs/{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"), False


def run_train(args: argparse.Namespace) -> int:
    cfg, run_dir, resume = prepare_run(args)
    if args.print_config:  # answered from the config alone, without loading torch
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from . import tasks
    from .dist import teardown

    job = tasks.pretrain if args.command == "pretrain" else tasks.finetune
    job(cfg, run_dir, resume=resume, overwrite=args.overwrite)
    # Leave the torchrun process group before exit (exiting inside it can abort), after success only: a
    # process that failed may have peers stuck in a collective, and leaving would wait on them, where exiting
    # lets the launcher restart the job (torchrun --max-restarts).
    teardown()
    print(f"run directory: {run_dir}")
    return 0


# ---------------------------------------------------------------- speedrun

SPEEDRUN_PRESET = "cifar10-speedrun"
SPEEDRUN_FLAGS = (  # (flag, section.key, type, help); type None: a switch
    (
        "--data",
        "run.data",
        str,
        "cifar10, cifar100, a folder of images (class subfolders give labels) or of tar shards, or "
        "hf:NAME[:SPLIT] (default: cifar10)",
    ),
    ("--minutes", "speedrun.minutes", float, "the budget: minutes of training, both stages together (default: 60)"),
    ("--label-fraction", "run.label_fraction", float, "fine-tune on this class-balanced share of the labels"),
    ("--labels-per-class", "run.labels_per_class", int, "fine-tune on this many labeled images per class"),
    ("--scratch", "speedrun.scratch", None, "also train a classifier from scratch on the same budget"),
    ("--pretrain-only", "speedrun.pretrain_only", None, "pretraining only (unlabeled data): no accuracy"),
    (
        "--test-fraction",
        "run.test_fraction",
        float,
        "held-out share of the training images (data without a test split: 0.1)",
    ),
    ("--val-fraction", "run.val_fraction", float, "validation share of the training images"),
    ("--seed", "run.seed", int, "random seed"),
    ("--device", "run.device", str, "auto, cpu, cuda, cuda:N or mps"),
    ("--precision", "run.precision", str, "auto, bf16, fp16 or fp32"),
    ("--num-workers", "run.num_workers", int, "data loading processes"),
    ("--data-root", "run.data_root", str, "where torchvision datasets are downloaded"),
)


def add_speedrun_args(p: argparse.ArgumentParser) -> None:
    for flag, dest, kind, text in SPEEDRUN_FLAGS:
        kwargs = (
            {"action": "store_const", "const": True}
            if kind is None
            else {"type": kind, "metavar": kind.__name__.upper()}
        )
        p.add_argument(flag, dest=dest, default=None, help=text, **kwargs)
    p.add_argument("--preset", metavar="NAME", help=f"the recipe (default: {SPEEDRUN_PRESET})")
    p.add_argument("--config", metavar="FILE.yaml", help="a speedrun's config.yaml: the same training, not measured")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/speedrun-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out run directory")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped speedrun; auto: continue --out if begun, else start it",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_speedrun(args: argparse.Namespace) -> int:
    from .config import resolve_speedrun

    flags: dict = {}
    for _, dest, _, _ in SPEEDRUN_FLAGS:
        if getattr(args, dest) is not None:
            section, key = dest.split(".")
            flags.setdefault(section, {})[key] = getattr(args, dest)
    run_dir, resume = resume_target(args, "state.json")
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise MAEError(f"cannot resume {run_dir}: no config.yaml there (is it a speedrun directory?)")
        spec = resolve_speedrun(None, str(run_dir / "config.yaml"), flags)
    else:
        preset = args.preset or (None if args.config else SPEEDRUN_PRESET)
        spec = resolve_speedrun(preset, args.config, flags)
        run_dir = run_dir or Path(args.out or f"runs/speedrun-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.print_config:
        print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
        return 0
    from .speedrun import speedrun

    speedrun(spec, run_dir, resume=resume, overwrite=args.overwrite)
    print(f"run directory: {run_dir}")
    return 0


# ---------------------------------------------------------------- evaluate, reconstruct, compare


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    tools.add_checkpoint_arg(
        p,
        "a finetune run directory (its best weights), a .safetensors file, or hf-hub:ORG/NAME[@REV] (a repo "
        "mae-torch wrote)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="cifar10/cifar100 (their test split) or a labeled folder (its test/ or val/ subfolder if present)",
    )
    tools.add_loader_args(p, device_help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--tta-flip", action="store_true", help="average the logits of each image and its mirror")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="score the training images that runs with this --test-fraction held out (data without a test split)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object: top1, loss, n")


def run_evaluate(args: argparse.Namespace) -> int:
    from .tasks import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.data_root,
        args.device,
        args.precision,
        args.batch_size,
        args.num_workers,
        args.tta_flip,
        args.test_fraction,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"top1 {result['top1']:.4f} | loss {result['loss']:.4f} | n {result['n']}")
    return 0


def add_reconstruct_args(p: argparse.ArgumentParser) -> None:
    tools.add_checkpoint_arg(
        p,
        "MAE weights with their decoder: a pretrain run directory, its .safetensors, any format mae convert "
        "reads, or hf-hub:ORG/NAME[@REV]",
    )
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="FILE_OR_FOLDER",
        help="image files and/or folders (searched recursively; the first 16 images are used)",
    )
    p.add_argument("--mask-ratio", type=float, default=None, help="share of patches removed (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--out", default="reconstructions.png", help="the PNG to write")


def run_reconstruct(args: argparse.Namespace) -> int:
    from .tasks import reconstruct

    out = reconstruct(args.checkpoint, args.images, args.out, args.mask_ratio, args.seed, args.device)
    print(f"wrote {out}")
    return 0


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (their metrics.jsonl)")
    p.add_argument("--out", default="compare.png", help="the PNG to write")


def run_compare(args: argparse.Namespace) -> int:
    from .plots import compare_runs

    compare_runs(args.runs, args.out)
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------- the table of commands


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str  # its line in `mae --help`
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status
    description: str | None = None  # the text under the usage line of `mae NAME --help`; None: none
    # pretrain/finetune write "(default: ...)" into each help themselves, since their flags default to "not given"
    show_defaults: bool = True


PRETRAIN = "MAE pretraining (no labels needed); writes a run directory"
FINETUNE = "train a classifier, from scratch or from a pretrained MAE encoder (--pretrained)"
KNN = "k-NN accuracy of a frozen encoder on labeled data (training split as memory)"
LINPROBE = "linear probing of a frozen encoder: BatchNorm + linear head, LARS or SGD"

SPEEDRUN = "the main job in one command: MAE pretraining, fine-tuning and top-1 on held-out images, in --minutes"

COMMANDS: tuple[Command, ...] = (
    Command("speedrun", SPEEDRUN, add_speedrun_args, run_speedrun, SPEEDRUN + ".", show_defaults=False),
    Command(
        "pretrain",
        PRETRAIN,
        partial(add_train_args, command="pretrain"),
        run_train,
        PRETRAIN + ".",
        show_defaults=False,
    ),
    Command(
        "finetune",
        FINETUNE,
        partial(add_train_args, command="finetune"),
        run_train,
        FINETUNE + ".",
        show_defaults=False,
    ),
    Command(
        "evaluate",
        "top-1 accuracy and loss of a fine-tuned classifier on labeled data",
        add_evaluate_args,
        run_evaluate,
    ),
    Command(
        "reconstruct",
        "reconstruct your own images with a pretrained MAE, as a picture",
        add_reconstruct_args,
        run_reconstruct,
    ),
    Command(
        "compare",
        "several runs' curves on shared axes (e.g. scratch against pretrained)",
        add_compare_args,
        run_compare,
    ),
    Command(
        "convert",
        "convert weights between official MAE checkpoints, transformers, timm and mae-torch files",
        tools.add_convert_args,
        tools.run_convert,
        "Convert weights: official MAE .pth, transformers' ViTMAE folder, timm .safetensors, mae-torch.",
    ),
    Command(
        "push",
        "upload a run's weights, config, metrics and a model card to the Hugging Face Hub",
        tools.add_push_args,
        tools.run_push,
        "Upload a run to the Hugging Face Hub in one commit: weights (ours, hf or timm format), config.yaml, "
        "metrics, pictures and a model card. The token comes from HF_TOKEN or `hf auth login`.",
    ),
    Command(
        "embed",
        "encoder features of a dataset (no masking) to a .npy file, with its labels beside",
        tools.add_embed_args,
        tools.run_embed,
    ),
    Command(
        "shards",
        "write a folder of images (or CIFAR) as WebDataset tar shards, optionally pre-resized",
        tools.add_shards_args,
        tools.run_shards,
    ),
    Command("knn", KNN, tools.add_knn_args, tools.run_knn, KNN + "."),
    Command("linprobe", LINPROBE, tools.add_linprobe_args, tools.run_linprobe, LINPROBE + "."),
    Command(
        "bench",
        "time the pretraining and fine-tuning steps: img/s, GFLOP/img, TFLOP/s, share of peak",
        partial(tools.add_bench_args, preset=DEFAULT_PRESET),
        tools.run_bench,
    ),
)
BY_NAME = {c.name: c for c in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mae",
        description="Masked Autoencoders (He et al. 2021): pretrain a ViT without labels, fine-tune, evaluate.",
        epilog="Run `mae COMMAND --help` for a command's options. Presets: " + ", ".join(preset_names()),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        formatter = argparse.ArgumentDefaultsHelpFormatter if c.show_defaults else argparse.HelpFormatter
        c.add_args(sub.add_parser(c.name, help=c.help, description=c.description, formatter_class=formatter))
    return parser


def run(args: argparse.Namespace) -> int:
    return BY_NAME[args.command].run(args)


def one_line(e: BaseException) -> str:
    """An error's message on one line; errors raised in DataLoader workers arrive wrapped with a traceback."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except MAEError as e:
        print(f"mae: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mae: interrupted; the last checkpoint is kept (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
