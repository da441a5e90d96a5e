"""The `mae` commands that work on weights and frozen features, and the timer: convert, push, embed, knn,
linprobe, bench.

Design decisions:
- cli.py keeps the entry point, the table of commands (`COMMANDS`) and the training/evaluation commands;
  this module holds the rest, each as a pair `add_NAME_args(parser)` / `run_NAME(args)` that a row of the
  table names. It does not import cli.py, so the two import without a cycle: what bench needs from there,
  the default preset, the table passes in as an argument.
- Like cli.py, it imports only the standard library at the top, so `mae COMMAND --help` loads no torch; each
  `run_NAME` imports the heavy module it needs inside itself, once the arguments are valid.
- `--checkpoint` and the loader's options (`add_checkpoint_arg`, `add_loader_args`) are written once and used
  by the commands of both modules, so their spelling and defaults stay the same everywhere.
- knn and linprobe share their encoder, data and validation options through `add_probe_args` and
  `probe_options`, so the two probes cannot drift apart.
"""

from __future__ import annotations

import argparse
import json

# ---------------------------------------------------------------- options several commands share

ANY_WEIGHTS = "weights in any format mae convert reads (run directory, file, folder) or hf-hub:ORG/NAME[@REV]"


def add_checkpoint_arg(p: argparse.ArgumentParser, what: str = ANY_WEIGHTS) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|WEIGHTS", help=what)


def add_loader_args(
    p: argparse.ArgumentParser, batch_size: bool = True, device_help: str = "auto, cpu, cuda, ..."
) -> None:
    """Where torchvision datasets live, images per forward pass, the device and the loader's processes."""
    p.add_argument("--data-root", default="", help="where torchvision datasets live")
    if batch_size:
        p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes")


# ---------------------------------------------------------------- weights: convert, push


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
    add_checkpoint_arg(p)
    p.add_argument("--data", required=True, help="cifar10/cifar100 or a folder of images (labeled or not)")
    p.add_argument("--out", default="feats.npy", help="features (N, D); labels go to OUT.labels.npy")
    p.add_argument("--pool", choices=["cls", "avg"], default=None, help="pooling (default: the model's own)")
    p.add_argument(
        "--split",
        choices=["train", "eval"],
        default="train",
        help="train: training images (a folder: all of it); eval: the test split, as mae evaluate",
    )
    add_loader_args(p)


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
    add_checkpoint_arg(p)
    p.add_argument("--data", required=True, help="cifar10/cifar100 or a labeled folder (train/ and val/ or one)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out when there is no val/")
    p.add_argument("--seed", type=int, default=0, help="validation carve and probe seed")
    p.add_argument(
        "--pool",
        choices=["cls", "avg"],
        default=pool_default,
        help="features: CLS token or mean patch token (knn default: the model's own)",
    )
    add_loader_args(p, batch_size=False)


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


# ---------------------------------------------------------------- shards


def add_shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a folder of images (class subfolders give labels; train/ val/ test/ kept) or cifar10")
    p.add_argument("out", help="the folder to write SPLIT-NNNNNN.tar shards and _info.json into")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument(
        "--resize", type=int, default=0, help="re-encode images at this shorter side (JPEG); 0 = as they are"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the order samples are written in")
    p.add_argument("--data-root", default="", help="where torchvision datasets are downloaded (cifar10/cifar100)")


def run_shards(args: argparse.Namespace) -> int:
    from .data.shard_writer import source_splits, write_shards

    splits, classes = source_splits(args.src, args.data_root or None)
    info = write_shards(splits, classes, args.out, args.shard_size, args.resize, args.seed)
    for split, entry in info["splits"].items():
        print(f"{split}: {entry['num_samples']} samples in {len(entry['filenames'])} shards")
    print(f"wrote {args.out}/_info.json")
    return 0


# ---------------------------------------------------------------- bench


def add_bench_args(p: argparse.ArgumentParser, preset: str) -> None:
    p.add_argument("--preset", default=preset, help="model and data shapes to time")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps, after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--attention", default="auto", help="auto, sdpa or math (see mae pretrain --help)")
    p.add_argument(
        "--augment",
        action="store_true",
        help="also time each step with the preset's training augmentation (crop, translation, flip, RandAugment, "
        "erasing; mixup/cutmix, label smoothing and EMA when fine-tuning), beside the bare step",
    )
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
        nargs="+",
        default=[],
        metavar="DATA",
        help="also time the streaming data path on these folders of images or tar shards, side by side",
    )
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes for --data")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def run_bench(args: argparse.Namespace) -> int:
    from .bench import bench, data_throughput, describe, machine
    from .runtime import resolve_device

    if not args.json:
        print(f"machine: {machine(resolve_device(args.device))}", flush=True)
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
        for data in args.data:
            r = data_throughput(data, args.preset, mode, args.batch_size, step, 2, args.device, args.num_workers)
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
