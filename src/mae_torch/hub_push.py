"""`mae push`: a run's weights, config, metrics and pictures, with a model card, to the Hugging Face Hub.

Design decisions:
- Everything is staged first, in a temporary folder, exactly as it will appear in the repository, then sent with
  one `upload_folder`: one commit, so a half-pushed repository never exists. `--dry-run DIR` writes that same
  folder to DIR and contacts nobody, so what one reviews is what would be sent.
- Staging, conversion included, comes before any Hub call: weights that the chosen format cannot hold (a
  classifier in transformers' format: convert.py's one-line error) fail before a repository is created.
- Three formats, from convert.py's readers and writers: `ours` (the run's weights file as mae-torch wrote it,
  with model.json), `hf` (transformers' save_pretrained folder), `timm` (a timm state dict and a timm
  config.json whose `model_args` rebuild the exact shape, so `timm.create_model("hf-hub:...")` works for any
  size, not only for the shapes timm has a name for).
- The weights are the run's best (best.safetensors), else its last: those `mae evaluate RUN` and
  `load_pretrained(RUN)` use. They are uploaded as model.safetensors, the name every loader looks for first.
- The model card is written from the run's files alone: config.yaml (the recipe: its command, model and train
  sections; the run section, which holds local paths, stays in the uploaded config.yaml), metrics.jsonl (the
  last and the best epoch, numbers as logged to 4 decimals) and the PNGs (uploaded beside it, linked). It
  claims no license: a run cannot know one.
- The token is huggingface_hub's business (HF_TOKEN, the token `hf auth login` saved): there is no --token
  flag, so none lands in shell history, and this module never reads one. Hub errors are scrubbed of anything
  token-like before they are shown, in case a server echoes one.
- Hub failures become one-line MAEErrors that say what to do: 401 -> log in, 403 -> a token with write
  access, no network -> --dry-run. Network errors are recognized by class name, since huggingface_hub's HTTP
  client changed across releases (requests, httpx, httpx2). Other exceptions keep their traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import yaml
from huggingface_hub import HfApi

from .config import ModelConfig
from .convert import Weights, build, description, read, write_hf, write_timm
from .errors import MAEError
from .models import weights_file

FORMATS = ("ours", "hf", "timm")
HUB = "https://huggingface.co"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
PICTURES = {"curves.png": "Training curves", "reconstructions.png": "Reconstructions"}
EXTRAS = ("metrics.jsonl", *PICTURES)  # copied beside the weights when the run has them
METRICS = ("train_loss", "val_loss", "val_acc", "knn_acc")  # the card's columns, where logged
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large"}
TIMM_SIZES[(1280, 32, 16)] = "huge"
# timm needs a registered name to call; model_args override all of its shape, so any ViT name would do
TIMM_FALLBACK = "vit_base_patch16_224"
LOG_IN = "log in with `hf auth login` or set HF_TOKEN"
OFFLINE = "no network: use --dry-run DIR to write the files locally"
NETWORK_ERRORS = {"TransportError", "ConnectionError", "Timeout"}  # httpx(2)'s base class; requests' two
NAMED_DATA = ("cifar10", "cifar100")  # the only `--data` values that name a data set rather than a local path
FILE_NOTES = {
    "README.md": "this card",
    "model.safetensors": "the weights",
    "model.json": "mae-torch's description of the model (architecture, sizes, input normalization, classes)",
    "config.json": "the model's configuration for {lib}",
    "preprocessor_config.json": "transformers' input size and normalization",
    "config.yaml": "the run's resolved config: `mae {command} --config config.yaml` reruns it",
    "metrics.jsonl": "one JSON line per epoch: losses, accuracy, learning rate, speed",
    "curves.png": "losses, accuracy and learning rate over the epochs",
    "reconstructions.png": "masked input, reconstruction and original of fixed validation images",
}


class Run(NamedTuple):
    folder: Path
    config: dict  # config.yaml
    metrics: list[dict]  # metrics.jsonl, one dict per epoch
    weights: Path  # the weights file pushed: best.safetensors, else model.safetensors
    w: Weights


# ---------------------------------------------------------------- the command


def push(
    run: str | Path,
    repo_id: str,
    fmt: str = "ours",
    private: bool = False,
    revision: str | None = None,
    dry_run: str | Path | None = None,
) -> str:
    """Stage a run's files for `repo_id`, then upload them in one commit (or write them to `dry_run`); returns a
    line saying where they went."""
    if fmt not in FORMATS:
        raise MAEError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not REPO_ID.match(repo_id):
        raise MAEError(f"{repo_id!r} is not a Hub repository id: write ORG/NAME (letters, digits, - _ .)")
    out = check_empty(Path(dry_run)) if dry_run else None
    loaded = load_run(Path(run))
    with tempfile.TemporaryDirectory(prefix="mae-push-") as tmp:
        files = stage(loaded, repo_id, fmt, revision, Path(tmp))
        if out is not None:
            shutil.copytree(tmp, out, dirs_exist_ok=True)
            return f"wrote {len(files)} files to {out}, uploaded nothing: {', '.join(files)}"
        upload(Path(tmp), repo_id, private, revision, f"mae push: {fmt} weights of run {loaded.folder.name}")
    return f"uploaded {len(files)} files to {HUB}/{repo_id}" + (f"/tree/{revision}" if revision else "")


def check_empty(path: Path) -> Path:
    """The --dry-run folder must be new or empty, so that what it holds afterwards is exactly what would be sent
    (it is created only once everything is staged: a failed push leaves no folder behind)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise MAEError(f"--dry-run {path} exists and is not an empty folder; remove it or choose another")
    return path


def load_run(folder: Path) -> Run:
    if not (folder / "config.yaml").is_file():
        raise MAEError(f"{folder} is not a mae-torch run directory (no config.yaml); pass the --out of a run")
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise MAEError(f"{folder / 'config.yaml'} is not valid YAML: {str(e).splitlines()[0]}") from None
    file = weights_file(folder)
    return Run(folder, config, read_metrics(folder / "metrics.jsonl"), file, read(file, "ours"))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise MAEError(f"{path} is not one JSON object per line ({e}); was the run's folder edited?") from None


# ---------------------------------------------------------------- staging


def stage(run: Run, repo_id: str, fmt: str, revision: str | None, folder: Path) -> list[str]:
    """Write the repository's files into `folder`; returns their names."""
    stage_weights(run, fmt, folder)
    for name in ("config.yaml", *EXTRAS):
        if (run.folder / name).is_file():
            shutil.copyfile(run.folder / name, folder / name)
    names = sorted([*listing(folder), "README.md"])
    (folder / "README.md").write_text(model_card(run, repo_id, fmt, revision, names))
    return names


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def stage_weights(run: Run, fmt: str, folder: Path) -> None:
    if fmt == "ours":  # the file itself, byte for byte, and its description as save_weights writes it
        shutil.copyfile(run.weights, folder / "model.safetensors")
        beside = run.weights.with_suffix(".json")
        text = beside.read_text() if beside.is_file() else json.dumps(description(run.w), indent=2)
        (folder / "model.json").write_text(text)
        return
    build(run.w)  # every key and shape must fit our model before it is written in another format (as convert)
    if fmt == "hf":
        write_hf(run.w, folder)
    else:
        write_timm(run.w, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(timm_config(run.w), indent=2))


def timm_architecture(m: ModelConfig) -> str:
    """timm's name for this shape where it has one (vit_base_patch16_224, ...), else a stand-in."""
    import timm  # a dependency of mae-torch; imported here since only this format needs its registry

    size = TIMM_SIZES.get((m.embed_dim, m.depth, m.num_heads))
    name = f"vit_{size}_patch{m.patch_size}_{m.img_size}"
    return name if size and m.mlp_ratio == 4 and m.qkv_bias and timm.is_model(name) else TIMM_FALLBACK


def timm_config(w: Weights) -> dict:
    """config.json as timm's push_to_hf writes it: the factory name, the arguments that rebuild the exact shape,
    and the pretrained_cfg that timm's data pipeline reads (input size, mean, std, crop)."""
    m = w.model
    if m.norm_eps != 1e-6:  # timm's ViT builds its LayerNorms with eps 1e-6, and config.json cannot change that
        raise MAEError(f"timm's ViT uses LayerNorm eps 1e-6, this model {m.norm_eps:g}: push it --format ours or hf")
    pool = "avg" if "fc_norm.weight" in w.state else "token"  # the keys tell: fc_norm iff avg pooling
    args = dict(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim)
    args.update(depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qkv_bias=m.qkv_bias, global_pool=pool)
    pretrained_cfg = {
        "input_size": [m.in_chans, m.img_size, m.img_size],
        "fixed_input_size": True,
        "interpolation": "bicubic",  # mae-torch resizes bicubically, as the official code
        "crop_pct": m.crop_pct,
        "crop_mode": "center",
        "mean": list(m.mean),
        "std": list(m.std),
        "num_classes": w.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    config = {"architecture": timm_architecture(m), "num_classes": w.num_classes, "num_features": m.embed_dim}
    config.update(global_pool=pool, model_args=args, pretrained_cfg=pretrained_cfg)
    if w.classes and len(w.classes) == w.num_classes:
        config["label_names"] = list(w.classes)
    return config


# ---------------------------------------------------------------- the model card


def model_card(run: Run, repo_id: str, fmt: str, revision: str | None, files: list[str]) -> str:
    sections = [
        front_matter(run, fmt),
        overview(run, repo_id, fmt),
        files_table(run, fmt, files),
        recipe(run),
        metrics_section(run),
        pictures(files),
        usage(run, repo_id, fmt, revision),
    ]
    return "\n\n".join(s.strip() for s in sections if s) + "\n"


def is_mae(run: Run, fmt: str) -> bool:
    """Whether the uploaded weights hold the decoder (timm's format keeps only the encoder)."""
    return run.w.arch == "mae" and fmt != "timm"


def front_matter(run: Run, fmt: str) -> str:
    classifier = run.w.arch == "vit" and run.w.num_classes > 0
    tags = ["mae", "masked-autoencoder", "vision-transformer"]
    tags.append("image-classification" if classifier else "self-supervised")
    tags += {"hf": ["transformers"], "timm": ["timm"]}.get(fmt, [])
    card = {"library_name": "mae-torch", "tags": tags}  # no license: the run cannot know it
    card["pipeline_tag"] = "image-classification" if classifier else "image-feature-extraction"
    pretrained = str(run.config.get("run", {}).get("pretrained") or "")
    if pretrained.startswith("hf-hub:"):  # a local path names nothing on the Hub
        card["base_model"] = pretrained.removeprefix("hf-hub:").split("@")[0]
    return f"---\n{yaml.safe_dump(card, sort_keys=False)}---"


def overview(run: Run, repo_id: str, fmt: str) -> str:
    w, m, cfg = run.w, run.w.model, run.config
    data = cfg.get("run", {}).get("data", "")
    data = f"on {data}" if data in NAMED_DATA else "on a folder of images"
    if w.arch == "mae":
        what = f"A masked autoencoder (MAE, He et al. 2021) pretrained without labels {data}"
        if fmt == "timm":
            what += ", its encoder only (timm's format leaves out the decoder, which only pretraining uses)"
    else:
        start = "a pretrained MAE encoder" if cfg.get("run", {}).get("pretrained") else "scratch"
        what = f"A ViT classifier ({w.num_classes} classes{names(w.classes)}) trained {data} from {start}"
    shape = f"ViT: {m.img_size}x{m.img_size} images ({m.in_chans} channels), {m.patch_size}x{m.patch_size} patches, "
    shape += f"width {m.embed_dim}, depth {m.depth}, {m.num_heads} heads, MLP ratio {m.mlp_ratio:g}, "
    shape += f"{m.pos_embed} positions, LayerNorm eps {m.norm_eps:g}"
    if is_mae(run, fmt):
        shape += f"; decoder width {m.decoder_embed_dim}, depth {m.decoder_depth}, {m.decoder_num_heads} heads; "
        shape += f"mask ratio {m.mask_ratio:g}, {'normalized' if m.norm_pix_loss else 'raw'} pixel targets"
    else:
        shape += f"; {m.global_pool} pooling"
    inputs = f"Inputs: scaled to [0, 1], then normalized with mean {list(m.mean)} and std {list(m.std)}."
    return f"# {repo_id.split('/')[1]}\n\n{what}, with mae-torch.\n\n- {shape}.\n- {inputs}\n- {weights_line(run)}"


def names(classes: list[str] | None, most: int = 10) -> str:
    if not classes:
        return ""
    return ": " + ", ".join(classes[:most]) + (", ..." if len(classes) > most else "")


def weights_line(run: Run) -> str:
    monitor = run.config.get("train", {}).get("monitor", "val_loss")
    best = [r for r in run.metrics if r.get("best")]
    if run.weights.name == "best.safetensors" and best:
        return f"Weights: the best epoch by {monitor}, epoch {best[-1]['epoch']} (the run's best.safetensors)."
    last = f", epoch {run.metrics[-1]['epoch']}" if run.metrics else ""
    return f"Weights: the last epoch{last} (the run's {run.weights.name})."


def files_table(run: Run, fmt: str, files: list[str]) -> str:
    lib = {"hf": "transformers (ViTMAE)", "timm": "timm (VisionTransformer)"}.get(fmt, "")
    command = run.config.get("command", "pretrain")
    rows = [f"| `{f}` | {FILE_NOTES.get(f, '').format(lib=lib, command=command)} |" for f in files]
    return "\n".join(["## Files", "", "| file | what |", "|---|---|", *rows])


def recipe(run: Run) -> str:
    shown = {k: run.config[k] for k in ("command", "model", "train") if k in run.config}
    intro = "The run's resolved config (the run section, with its local paths, is in config.yaml):"
    text = yaml.safe_dump(shown, sort_keys=False, default_flow_style=None)  # short lists on one line
    return f"## Recipe\n\n{intro}\n\n```yaml\n{text}```"


def metrics_section(run: Run) -> str:
    rows = run.metrics
    if not rows:
        return "## Metrics\n\nThe run logged no metrics (no metrics.jsonl)."
    planned = run.config.get("train", {}).get("epochs")
    done = f"Epochs trained: {rows[-1]['epoch']}" + (f" of {planned} planned" if planned else "")
    best = [r for r in rows if r.get("best")]
    columns = [k for k in METRICS if any(k in r for r in rows)]
    table = ["| | epoch | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for label, r in (("last", rows[-1]), *((("best", best[-1]),) if best else ())):
        cells = [number(r.get(k)) for k in columns]
        table.append(f"| {label} | {r['epoch']} | " + " | ".join(cells) + " |")
    where = "val_* on the run's validation split (its val/ folder, else images held out of training)"
    return f"## Metrics\n\n{done}; {where}.\n\n" + "\n".join(table)


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def pictures(files: list[str]) -> str:
    shown = [f"### {title}\n\n![{title}]({name})" for name, title in PICTURES.items() if name in files]
    return "\n\n".join(["## Pictures", *shown]) if shown else ""


def usage(run: Run, repo_id: str, fmt: str, revision: str | None) -> str:
    ref = f"{repo_id}@{revision}" if revision else repo_id
    kind = "MaskedAutoencoder (encoder and decoder)" if is_mae(run, fmt) else "ViT"
    parts = [
        "## Use",
        f"With mae-torch (`pip install mae-torch`): a {kind}.",
        f'```python\nimport mae_torch\n\nmodel = mae_torch.load_pretrained("hf-hub:{ref}")\n```',
    ]
    if run.w.arch == "mae":
        parts.append(f"Fine-tune its encoder: `mae finetune --pretrained hf-hub:{ref} --data DATA`.")
    if fmt == "hf":
        cls = "ViTMAEForPreTraining" if run.w.arch == "mae" else "ViTMAEModel"
        rev = f', revision="{revision}"' if revision else ""
        parts.append("With transformers:")
        code = f"from transformers import AutoImageProcessor, {cls}\n\n"
        code += f'processor = AutoImageProcessor.from_pretrained("{repo_id}"{rev})\n'
        parts.append(f'```python\n{code}model = {cls}.from_pretrained("{repo_id}"{rev})\n```')
    if fmt == "timm":
        parts.append("With timm:")
        code = f'import timm\n\nmodel = timm.create_model("hf-hub:{ref}", pretrained=True)\n'
        code += "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
        parts.append(f"```python\n{code}```")
    return "\n\n".join(parts)


# ---------------------------------------------------------------- the upload


def upload(folder: Path, repo_id: str, private: bool, revision: str | None, message: str) -> None:
    """Create the repository (and branch) if needed, then commit the folder; Hub errors as one line."""
    try:
        api = HfApi()  # the token: HF_TOKEN, else the one `hf auth login` saved (huggingface_hub reads them)
        # private=None, not False: a new repository then gets its namespace's default (an org may require private)
        api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message, repo_type="model"
        )
    except Exception as e:
        error = hub_error(e, repo_id)
        if error is None:
            raise
        raise error from None


def hub_error(e: Exception, repo_id: str) -> MAEError | None:
    """The one-line MAEError for a failed Hub call, or None for what is no Hub failure (a bug: keep its traceback)."""
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError

    status = getattr(getattr(e, "response", None), "status_code", None)
    detail = scrub(str(e).splitlines()[0] if str(e).strip() else type(e).__name__)
    if isinstance(e, LocalTokenNotFoundError) or status == 401:
        return MAEError(f"the Hub refused the token or found none ({detail}): {LOG_IN}")
    if status == 403:
        org = repo_id.split("/")[0]
        return MAEError(f"the token may not write to {org} ({detail}): log in with a write token (`hf auth login`)")
    if isinstance(e, HFValidationError):
        return MAEError(f"{repo_id!r} is not a valid Hub repository id: {detail}")
    if isinstance(e, HfHubHTTPError):
        return MAEError(f"the Hub refused the upload to {repo_id}: {detail}")
    if is_network_error(e):
        return MAEError(f"cannot reach the Hugging Face Hub ({detail}): {OFFLINE}")
    return None


def is_network_error(e: Exception) -> bool:
    """Connection and timeout errors of whichever HTTP client huggingface_hub uses (requests, httpx, httpx2)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(names & NETWORK_ERRORS)


def scrub(text: str) -> str:
    """The text without the token: HF_TOKEN's value and anything shaped like a Hub token (hf_...)."""
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
