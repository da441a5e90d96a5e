"""The `mae` command line: pretrain, finetune, evaluate, reconstruct, compare, convert, push, embed, knn, linprobe,
bench.

Design decisions:
- One table, `COMMANDS`, lists every subcommand: its name, its one-line help, a function that adds its
  arguments and a function that runs it (returning the exit status). `build_parser` and `run` only walk
  that table, so adding a command is one row and two small functions, and no `if command == ...` chain.
- `mae --help` and `mae COMMAND --help` load no torch (nor timm, torchvision, tensorboard, matplotlib,
  numpy), which take seconds to import: this module imports only the standard library, yaml (config.py)
  and errors.py at the top. Each handler imports the heavy modules it needs inside itself, once the
  arguments are valid; handlers are the one place in this package where function-level imports are
  deliberate. The package's `__init__` exports its torch-backed names lazily for the same reason.
- Every config field is a flag (`--mask-ratio`, `--batch-size`, ...), generated from the dataclasses in
  config.py so the help text and the config can never disagree. Flags default to "not given", so only what
  you type overrides the preset and the `--config` file.
- A run directory is never overwritten silently: an existing non-empty `--out` needs `--overwrite`, and
  `--resume RUN_DIR` continues a run from its own config.yaml and checkpoint.pt.
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
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_flags(p)


def prepare_run(args: argparse.Namespace):
    """The resolved config and the run directory."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise MAEError(f"cannot resume {run_dir}: no config.yaml and checkpoint.pt there")
        return resolve(args.command, None, str(run_dir / "config.yaml"), overrides(args)), run_dir
    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    cfg = resolve(args.command, preset, args.config, overrides(args))
    return cfg, Path(args.out or f"runs/{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_train(args: argparse.Namespace) -> int:
    cfg, run_dir = prepare_run(args)
    if args.print_config:  # answered from the config alone, without loading torch
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from . import tasks

    job = tasks.pretrain if args.command == "pretrain" else tasks.finetune
    job(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    print(f"run directory: {run_dir}")
    return 0


# ---------------------------------------------------------------- evaluate, reconstruct, compare, convert, push


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR|WEIGHTS",
        help="a finetune run directory (its best weights), a .safetensors file, or hf-hub:ORG/NAME[@REV] (a repo "
        "mae-torch wrote)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="cifar10/cifar100 (their test split) or a labeled folder (its test/ or val/ subfolder if present)",
    )
    p.add_argument("--data-root", default="", help="where torchvision datasets live")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes")
    p.add_argument("--tta-flip", action="store_true", help="average the logits of each image and its mirror")
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
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"top1 {result['top1']:.4f} | loss {result['loss']:.4f} | n {result['n']}")
    return 0


def add_reconstruct_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR|WEIGHTS",
        help="MAE weights with their decoder: a pretrain run directory, its .safetensors, any format mae convert "
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


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        metavar="SRC",
        help="a .pth, a .safetensors, a save_pretrained folder, a run directory, or hf-hub:ORG/NAME[@REV]",
    )
    p.add_argument("out", metavar="OUT", help="the file (.pth, .safetensors) or, for hf, the folder to write")
    p.add_argument(
        "--from",
        dest="src_format",
        choices=["auto", "official", "hf", "timm", "ours"],
        default="auto",
        help="format of SRC; auto recognizes it from its layout, metadata and tensor names",
    )
    p.add_argument(
        "--to", dest="dst_format", choices=["official", "hf", "timm", "ours"], required=True, help="format of OUT"
    )
    p.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="encoder attention heads where SRC does not say (default: official sizes, else width/64)",
    )
    p.add_argument("--decoder-num-heads", type=int, default=None, help="decoder attention heads, likewise")
    p.add_argument(
        "--dtype",
        choices=["keep", "float32", "float16", "bfloat16"],
        default="keep",
        help="precision of the written weights (keep: as SRC stores them; float16 halves the file for sharing)",
    )


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    a = args
    out = convert(a.src, a.src_format, a.out, a.dst_format, a.num_heads, a.decoder_num_heads, a.dtype)
    print(f"wrote {out}")
    return 0


def add_push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a mae-torch run directory (its best weights, else its last)")
    p.add_argument("repo_id", metavar="ORG/NAME", help="the Hub model repository; created if it does not exist")
    p.add_argument("--private", action="store_true", help="make a new repository private (an existing one stays as is)")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["ours", "hf", "timm"],
        default="ours",
        help="the weights as mae-torch writes them, transformers' ViTMAE folder (MAE or encoder), or a timm ViT",
    )
    p.add_argument("--revision", metavar="BRANCH", default=None, help="the branch to commit to, created if missing")
    p.add_argument(
        "--dry-run",
        metavar="DIR",
        default=None,
        help="write the files into DIR (new or empty) and upload nothing; works offline",
    )


def run_push(args: argparse.Namespace) -> int:
    from .hub_push import push  # the token comes from HF_TOKEN or `hf auth login`, never from a flag

    print(push(args.run, args.repo_id, args.fmt, args.private, args.revision, args.dry_run))
    return 0


# ---------------------------------------------------------------- frozen encoders: embed, knn, linprobe


def add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR|WEIGHTS",
        help="weights in any format mae convert reads (run directory, file, folder) or hf-hub:ORG/NAME[@REV]",
    )
    p.add_argument("--data", required=True, help="cifar10/cifar100 or a folder of images (labeled or not)")
    p.add_argument("--out", default="feats.npy", help="features (N, D); labels go to OUT.labels.npy")
    p.add_argument("--pool", choices=["cls", "avg"], default=None, help="pooling (default: the model's own)")
    p.add_argument(
        "--split",
        choices=["train", "eval"],
        default="train",
        help="train: training images (a folder: all of it); eval: the test split, as mae evaluate",
    )
    p.add_argument("--data-root", default="", help="where torchvision datasets live")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes")


def run_embed(args: argparse.Namespace) -> int:
    from .features import embed

    summary = embed(
        args.checkpoint,
        args.data,
        args.out,
        args.pool,
        args.split,
        args.data_root,
        args.batch_size,
        args.device,
        args.num_workers,
    )
    print(json.dumps(summary))
    return 0


def add_probe_args(p: argparse.ArgumentParser, pool_default: str | None) -> None:
    """The options knn and linprobe share: the encoder, the labeled data and its validation carve."""
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR|WEIGHTS",
        help="weights in any format mae convert reads (run directory, file, folder) or hf-hub:ORG/NAME[@REV]",
    )
    p.add_argument("--data", required=True, help="cifar10/cifar100 or a labeled folder (train/ and val/ or one)")
    p.add_argument("--data-root", default="", help="where torchvision datasets live")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out when there is no val/")
    p.add_argument("--seed", type=int, default=0, help="validation carve and probe seed")
    p.add_argument(
        "--pool",
        choices=["cls", "avg"],
        default=pool_default,
        help="features: CLS token or mean patch token (knn default: the model's own)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes")


def probe_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of the options from `add_probe_args`, as features.knn/linprobe take them."""
    return dict(
        pool=args.pool,
        data_root=args.data_root,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
    )


def add_knn_args(p: argparse.ArgumentParser) -> None:
    add_probe_args(p, pool_default=None)
    p.add_argument("--k", type=int, default=20, help="neighbours that vote")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")


def run_knn(args: argparse.Namespace) -> int:
    from .features import knn

    print(json.dumps(knn(args.checkpoint, args.data, args.k, args.temperature, **probe_options(args))))
    return 0


def add_linprobe_args(p: argparse.ArgumentParser) -> None:
    add_probe_args(p, pool_default="cls")
    p.add_argument("--epochs", type=int, default=90, help="probe epochs (the paper: 90 on ImageNet)")
    p.add_argument("--batch-size", type=int, default=4096, help="probe batch (the paper: 16384)")
    p.add_argument("--blr", type=float, default=0.1, help="base lr; lr = blr x batch / 256")
    p.add_argument("--optimizer", choices=["lars", "sgd"], default="lars", help="the paper: LARS")
    p.add_argument(
        "--augment",
        action="store_true",
        help="the paper's protocol: a new crop (0.08-1) + flip of every image each epoch, one encoder "
        "pass per image per epoch (default: features computed once, fast on small data)",
    )


def run_linprobe(args: argparse.Namespace) -> int:
    from .features import linprobe

    result = linprobe(
        args.checkpoint,
        args.data,
        args.epochs,
        args.batch_size,
        args.blr,
        args.optimizer,
        augment=args.augment,
        **probe_options(args),
    )
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- bench


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET, help="model and data shapes to time")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps, after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--attention", default="auto", help="auto, sdpa or math (see mae pretrain --help)")
    p.add_argument("--augment", action="store_true", help="add the paper's crop (0.2-1) and flip to every step")
    p.add_argument("--mode", choices=["pretrain", "finetune", "both"], default="both", help="which step")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also time the starting project's design (fp32, eager, host-side shuffles)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also time transformers' ViTMAEForPreTraining (SDPA) on the same shapes and precision",
    )
    p.add_argument(
        "--data",
        default="",
        metavar="FOLDER",
        help="also time the streaming data path on this folder of images, beside the model step",
    )
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes for --data")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def run_bench(args: argparse.Namespace) -> int:
    from .bench import bench, data_throughput, describe

    modes = ("pretrain", "finetune") if args.mode == "both" else (args.mode,)
    results = []
    for r in bench(
        args.preset,
        args.batch_size,
        args.steps,
        args.warmup,
        args.device,
        args.precision,
        args.baseline,
        args.compile,
        modes,
        args.attention,
        args.augment,
        args.peers,
    ):
        results.append(r)
        print(json.dumps(r) if args.json else describe(r), flush=True)
    for mode in modes if args.data else ():
        step = args.steps + args.warmup
        r = data_throughput(args.data, args.preset, mode, args.batch_size, step, 2, args.device, args.num_workers)
        results.append(r)
        print(json.dumps(r) if args.json else describe(r), flush=True)
        model = next(x["img_per_s"] for x in results if x["design"] == "mae-torch" and x["mode"] == mode)
        if not args.json:
            print(f"{mode:>8}: data / model step = {r['img_per_s'] / model:.2f} (below 1: the step waits on data)")
    ours = next((r["img_per_s"] for r in results if r["design"] == "mae-torch" and r["mode"] == "pretrain"), 0)
    for design, what in (("baseline", "the starting design"), ("transformers", "transformers' ViTMAE")):
        other = [r["img_per_s"] for r in results if r["design"] == design]
        if other and ours and not args.json:
            print(f"pretraining speed-up over {what}: {ours / other[0]:.2f}x")
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

COMMANDS: tuple[Command, ...] = (
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
        add_convert_args,
        run_convert,
        "Convert weights: official MAE .pth, transformers' ViTMAE folder, timm .safetensors, mae-torch.",
    ),
    Command(
        "push",
        "upload a run's weights, config, metrics and a model card to the Hugging Face Hub",
        add_push_args,
        run_push,
        "Upload a run to the Hugging Face Hub in one commit: weights (ours, hf or timm format), config.yaml, "
        "metrics, pictures and a model card. The token comes from HF_TOKEN or `hf auth login`.",
    ),
    Command(
        "embed",
        "encoder features of a dataset (no masking) to a .npy file, with its labels beside",
        add_embed_args,
        run_embed,
    ),
    Command("knn", KNN, add_knn_args, run_knn, KNN + "."),
    Command("linprobe", LINPROBE, add_linprobe_args, run_linprobe, LINPROBE + "."),
    Command(
        "bench",
        "time the pretraining and fine-tuning steps: img/s, GFLOP/img, TFLOP/s, share of peak",
        add_bench_args,
        run_bench,
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
