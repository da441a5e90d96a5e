"""Weights in and out: official MAE checkpoints, transformers' ViTMAE, timm ViTs and mae-torch files.

Design decisions:
- Every format is read into one value, `Weights`: a state dict in *our* names (the official checkpoints' and
  timm's, so these two need no renaming), a `ModelConfig`, the arch ("mae" when a decoder is present, else
  "vit") and the class count. Every writer starts from it: a conversion is a read and a write.
- Shapes are the truth: widths, depths, patch, grid, channels, MLP ratio and qkv bias (its keys, present or
  not) come from the tensors. Attention heads leave no trace in them (qkv is (3D, D) for any head count): they
  come from the file's own description (our metadata, transformers' config.json, timm's model_args), else the
  official models' table, else D / 64; `num_heads=` wins. LayerNorm eps leaves none either: the description's,
  else 1e-6.
- No code runs when reading: pickles load with `weights_only=True`, allowing only `argparse.Namespace`
  (official checkpoints pickle their args). Anything else is an MAEError, never a retry without the guard.
- transformers renamed ViTMAE's tensors in v5 (`encoder.layer.i.attention.attention.query` ->
  `layers.i.attention.q_proj`, ...) and v5 saves the old names, the decoder's blocks as
  `decoder_encoder.layer.i`. The reader takes all of them; the writer fills the installed version's model,
  lets it save, and writes the hub's names, which transformers 4 and 5 both load.
- Weights on the Hugging Face Hub are `hf-hub:ORG/NAME[@REVISION]`: `read` resolves the reference to the
  downloaded snapshot folder (hub.py, once, in one place) and reads it as any local folder. A folder is ours
  when it holds a model.json (or no config.json: a run directory), timm's when its config.json names an
  `architecture` (timm's hub layout: mean, std and crop come from its `pretrained_cfg`), else transformers'.
- Files we write carry our model description (a `mae_torch` entry or metadata, which the official code and
  timm ignore; preprocessor_config.json for transformers), so every round trip is exact.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import asdict, replace
from math import isqrt
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, from_dict
from .errors import MAEError
from .hub import resolve_ref
from .models import DECODER, build_mae, build_vit, load_weights, model_config_from, save_weights
from .resize import is_sincos

FORMATS = ("official", "hf", "timm", "ours")
HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H (timm, models_mae.py)
DECODER_HEADS = {512: 16}  # the official decoder: 512 wide, 16 heads, for every model size

# fmt: off
# transformers' ViTMAE names (v4 and v5; "vit." prefix stripped) -> ours; `.weight` / `.bias` follow both.
HF_NAMES = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm",
            "decoder.decoder_embed": "decoder_embed", "decoder.mask_token": "mask_token",
            "decoder.decoder_pos_embed": "decoder_pos_embed", "decoder.decoder_norm": "decoder_norm",
            "decoder.decoder_pred": "decoder_pred"}
HF_BLOCK = re.compile(r"^(decoder\.decoder_layers|decoder\.decoder_encoder\.layer|encoder\.layer|layers)\.(\d+)\.(.+)$")
HF_IN_BLOCK = {"attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",  # v4 name, v5 name
               "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
               "layernorm_before": "norm1", "layernorm_after": "norm2"}
QKV = {"query": 0, "q_proj": 0, "key": 1, "k_proj": 1, "value": 2, "v_proj": 2}  # their third of our qkv
# ViTMAEConfig fields -> ModelConfig fields (the MLP widths are mlp_ratio * width)
HF_CONFIG = {"hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
             "image_size": "img_size", "patch_size": "patch_size", "num_channels": "in_chans",
             "decoder_hidden_size": "decoder_embed_dim", "decoder_num_hidden_layers": "decoder_depth",
             "decoder_num_attention_heads": "decoder_num_heads", "mask_ratio": "mask_ratio",
             "norm_pix_loss": "norm_pix_loss", "layer_norm_eps": "norm_eps", "qkv_bias": "qkv_bias"}
# fmt: on


class Weights(NamedTuple):
    state: dict[str, torch.Tensor]  # our key names
    model: ModelConfig
    arch: str  # "mae" (with decoder) or "vit"
    num_classes: int  # 0: no head
    classes: list[str] | None = None


# ---------------------------------------------------------------- files, read without running code


def torch_load(path: Path) -> Any:
    """A pickle's tensors and plain data, running no code; official checkpoints' argparse args allowed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = m[1] if (m := re.search(r"GLOBAL (\S+)", str(e))) else "code"
        raise MAEError(
            f"{path} needs {what} to load and mae-torch never runs code from a file: re-save its tensors"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:  # missing, truncated, not a torch file
        raise MAEError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def read_json(path: Path) -> dict | None:
    """A JSON description beside weights (config.json, ...), None when there is none."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MAEError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise MAEError(f"{path} is not a JSON object of settings")
    return data


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, our model description if the file carries one)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("mae_torch")
        return load_file(str(path)), json.loads(meta) if meta else None
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise MAEError(f"cannot read {path}: {e}") from None


def hf_key(key: str) -> tuple[str, int | None] | None:
    """transformers' tensor name -> (our name, its third of qkv or None); None: not a ViTMAE name."""
    name, dot, leaf = key.rpartition(".")
    if leaf not in ("weight", "bias"):
        name, dot, leaf = key, "", ""
    name = name.removeprefix("vit.")  # ViTMAEForPreTraining nests the encoder; ViTMAEModel does not
    if m := HF_BLOCK.match(name):
        part = QKV.get(m[3].rsplit(".", 1)[-1]) if m[3].startswith("attention.") else None
        inner = "attn.qkv" if part is not None else HF_IN_BLOCK.get(m[3])
        where = "decoder_blocks" if m[1].startswith("decoder") else "blocks"
        return (f"{where}.{m[2]}.{inner}{dot}{leaf}", part) if inner else None
    return (HF_NAMES[name] + dot + leaf, None) if name in HF_NAMES else None


# ---------------------------------------------------------------- what the tensors say


def head_count(given: int | None, known: int | None, width: int, table: dict[int, int], flag: str) -> int:
    """The file's own word first (heads do not show in shapes: a wrong count would load silently), then
    the caller's `given` hint, then the official sizes, then timm's usual 64-wide heads."""
    if known or given:
        return known or given
    if width in table or width % 64 == 0:
        return table.get(width, width // 64)  # the official sizes, else timm's usual 64-wide heads
    raise MAEError(f"cannot tell the attention heads of a {width}-wide model from its tensors; pass {flag}")


def infer_config(state: dict, known: dict | None = None, num_heads=None, decoder_num_heads=None) -> ModelConfig:
    """Our ModelConfig from the tensors' shapes; `known` (the file's own description) fills what they hide."""
    known = dict(known or {})
    try:
        w, pos, fc1 = state["patch_embed.proj.weight"], state["pos_embed"], state["blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise MAEError(f"not ViT weights: no tensor {e}; check --from") from None
    D, C, p, L = w.shape[0], w.shape[1], w.shape[-1], pos.shape[1] - 1  # L: patches (minus the CLS position)
    if isqrt(L) ** 2 != L or w.shape[-2] != p:
        raise MAEError(f"{L + 1} positions fit no square grid plus CLS (no_embed_class, non-square: unsupported)")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    fields = dict(img_size=isqrt(L) * p, patch_size=p, in_chans=C, embed_dim=D, depth=depth, mlp_ratio=fc1.shape[0] / D)
    fields["qkv_bias"] = "blocks.0.attn.qkv.bias" in state  # timm leaves the key out without bias
    fields["pos_embed"] = known.get("pos_embed") or ("sincos" if is_sincos(pos) else "learned")  # said, else seen
    fields["num_heads"] = head_count(num_heads, known.get("num_heads"), D, HEADS, "--num-heads")
    if "decoder_embed.weight" in state:
        E = state["decoder_embed.weight"].shape[0]
        if state["decoder_blocks.0.mlp.fc1.weight"].shape[0] != fc1.shape[0] // D * E:
            raise MAEError("encoder and decoder MLP ratios differ; mae-torch's MAE uses one mlp_ratio for both")
        fields.update(decoder_embed_dim=E, decoder_depth=len({k.split(".")[1] for k in state if "r_blocks." in k}))
        given = (decoder_num_heads, known.get("decoder_num_heads"))
        fields["decoder_num_heads"] = head_count(*given, E, DECODER_HEADS, "--decoder-num-heads")
    else:  # a classifier's pooling shows in its keys: fc_norm iff avg (an MAE's is its fine-tuning setting)
        fields["global_pool"] = "avg" if "fc_norm.weight" in state else "cls"
    if len(known.get("mean", IMAGENET_MEAN)) != C:  # no mean/std for these channels: ImageNet's, averaged
        known["mean"], known["std"] = [sum(IMAGENET_MEAN) / 3] * C, [sum(IMAGENET_STD) / 3] * C
    # norm_eps: the file's word, else ModelConfig's 1e-6; official checkpoints and timm state dicts carry no eps,
    # and the official MAE and timm's ViT both use 1e-6.
    cfg = from_dict(ModelConfig, {**known, **fields})
    cfg.validate()
    return cfg


def weights_from(state: dict, meta: dict | None, known: dict | None = None, **heads) -> Weights:
    """Weights of a state dict in our names; `meta`: our description, if the file carries one."""
    known = {**(meta or {}).get("model", {}), **(known or {})}
    arch = "mae" if "decoder_pred.weight" in state else "vit"
    n = state["head.weight"].shape[0] if "head.weight" in state else 0
    return Weights(state, infer_config(state, known, **heads), arch, n, (meta or {}).get("classes"))


# ---------------------------------------------------------------- readers


def read_ours(src: str | Path) -> Weights:
    state, meta = load_weights(src)
    n = state["head.weight"].shape[0] if "head.weight" in state else 0
    return Weights(state, model_config_from(meta), meta.get("arch", "mae"), n, meta.get("classes"))


def read_official(src: str | Path | dict, num_heads: int | None = None, decoder_num_heads=None) -> Weights:
    """facebookresearch/mae checkpoints: {"model": state dict, "args": Namespace, ...}."""
    ckpt = src if isinstance(src, dict) else torch_load(Path(src))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise MAEError(f"{src} is not an official MAE checkpoint: expected a dict with a 'model' state dict")
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    meta = json.loads(ckpt["mae_torch"]) if "mae_torch" in ckpt else None
    known = {k: args[k] for k in ("mask_ratio", "norm_pix_loss") if k in args and not meta}
    state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}  # DDP-wrapped saves
    return weights_from(state, meta, known, num_heads=num_heads, decoder_num_heads=decoder_num_heads)


def read_timm(src: str | Path | dict, num_heads: int | None = None, decoder_num_heads=None) -> Weights:
    """A timm VisionTransformer state dict (our names already): .safetensors, or .pth/.bin without code, or a
    folder in timm's hub layout (config.json + model.safetensors)."""
    path, meta, said = src, None, None
    if not isinstance(src, dict):
        path, said = timm_files(Path(src))
        src, meta = read_safetensors(path) if path.suffix == ".safetensors" else (torch_load(path), None)
    state = src.get("state_dict", src) if isinstance(src, dict) else None  # timm's train.py checkpoints nest it
    if not isinstance(state, dict):
        raise MAEError(f"{path} holds no state dict (a dict of tensors)")
    meta = meta or said  # our own description, where the file carries one, is exact; else timm's config.json's
    return weights_from(dict(state), meta, num_heads=num_heads, decoder_num_heads=decoder_num_heads)


def timm_files(path: Path) -> tuple[Path, dict | None]:
    """(the weights file, what timm's config.json beside it says that shapes do not, as our description) of a
    file or a hub folder."""
    folder = path if path.is_dir() else path.parent
    config = read_json(folder / "config.json") or {}
    if path.is_dir():
        path = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()), None)
        if path is None:
            raise MAEError(f"no weights in {folder}: expected model.safetensors or pytorch_model.bin (timm's layout)")
    if "architecture" not in config:  # not timm's: another library's config.json, or none
        return path, None
    pre, args = config.get("pretrained_cfg") or {}, config.get("model_args") or {}
    model = {k: pre[k] for k in ("mean", "std", "crop_pct") if k in pre}  # the input normalization travels along
    model.update({k: args[k] for k in ("num_heads",) if k in args})  # timm's own word, where it states it
    classes = config.get("label_names")  # push_to_hf's class names, where it wrote them (one per output)
    classes = list(classes) if isinstance(classes, list) and len(classes) == config.get("num_classes") else None
    return path, {"model": model, "classes": classes}


def read_hf(src: str | Path | dict, config: dict | None = None, num_heads=None, decoder_num_heads=None) -> Weights:
    """transformers' ViTMAEForPreTraining / ViTMAEModel: a state dict (+ its config), or a saved folder."""
    src, config, pre = (src, config, {}) if isinstance(src, dict) else hf_files(Path(src))
    state, qkv, unknown = {}, {}, []
    for key, value in src.items():
        ours, part = hf_key(key) or (None, None)
        if ours is None:
            unknown.append(key)
        elif part is None:
            state[ours] = value
        else:
            qkv.setdefault(ours, [None] * 3)[part] = value
    if unknown or any(t is None for parts in qkv.values() for t in parts):
        raise MAEError(f"not transformers' ViTMAE weights: unknown {unknown[:4]} or an incomplete query/key/value")
    state.update({k: torch.cat(parts) for k, parts in qkv.items()})  # rows q, k, v: timm's qkv layout
    c = config or {}
    if c.get("model_type", "vit_mae") != "vit_mae":
        raise MAEError(f"this is transformers' {c['model_type']}, not a ViTMAE (vit_mae); mae-torch reads ViTMAE")
    if c.get("hidden_act", "gelu") != "gelu":
        raise MAEError(f"this ViTMAE uses the activation {c['hidden_act']}; mae-torch's blocks use exact GELU")
    # layer_norm_eps and qkv_bias are kept (HF_CONFIG): our 1e-6 for the hub's 1e-12 moves the loss far beyond
    # rounding wherever LayerNorm inputs vary little (test_transformers_default_eps_is_kept)
    known = {ours: c[theirs] for theirs, ours in HF_CONFIG.items() if theirs in c}
    known.update(
        {ours: pre[theirs] for theirs, ours in (("image_mean", "mean"), ("image_std", "std")) if theirs in pre}
    )
    return weights_from(state, None, known, num_heads=num_heads, decoder_num_heads=decoder_num_heads)


def hf_files(path: Path) -> tuple[dict, dict | None, dict]:
    """(tensors, config.json, preprocessor_config.json) of a save_pretrained folder or of a file in one."""
    folder = path if path.is_dir() else path.parent
    config, pre = (folder / "config.json", folder / "preprocessor_config.json")
    config, pre = (json.loads(f.read_text()) if f.exists() else None for f in (config, pre))
    file = path if path.is_file() else folder / "model.safetensors"
    if not file.exists() and (folder / "pytorch_model.bin").exists():  # older saves; read without code
        file = folder / "pytorch_model.bin"
    return read_safetensors(file)[0] if file.suffix == ".safetensors" else torch_load(file), config, pre or {}


def detect(path: Path) -> tuple[str, Any]:
    """(format, the loaded pickle when telling needed it, else None)."""
    if path.is_dir():
        return folder_format(path), None
    if not path.exists():
        raise MAEError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
        except (SafetensorError, OSError) as e:
            raise MAEError(f"cannot read {path}: {e}") from None
        if "mae_torch" in meta or path.with_suffix(".json").exists():
            return "ours", None
        return ("hf" if any(hf_key(k) for k in keys) else "timm"), None
    obj = torch_load(path)
    if isinstance(obj, dict) and "model" in obj:
        return "official", obj
    return ("hf" if isinstance(obj, dict) and any(hf_key(k) for k in obj) else "timm"), obj


def folder_format(path: Path) -> str:
    """Ours: a model.json (a repo mae-torch wrote) or no config.json (a run directory); timm's: a config.json
    naming the `architecture`; else transformers' save_pretrained layout."""
    config = path / "config.json"
    if (path / "model.json").exists() or not config.exists():
        return "ours"
    return "timm" if "architecture" in (read_json(config) or {}) else "hf"


def detect_format(path: str | Path) -> str:
    """ "official", "hf", "timm" or "ours", from the file's layout, metadata and tensor names."""
    return detect(resolve_ref(path))[0]


def read(path: str | Path, fmt: str = "auto", num_heads: int | None = None, decoder_num_heads=None) -> Weights:
    """Weights in any format, from a path or an `hf-hub:ORG/NAME[@REVISION]` reference."""
    path, loaded = resolve_ref(path), None
    if fmt == "auto":
        fmt, loaded = detect(path)
    if fmt == "ours":
        return read_ours(path)  # heads and everything else are in its metadata
    readers = {"official": read_official, "timm": read_timm, "hf": read_hf}
    if fmt not in readers:
        raise MAEError(f"unknown weights format {fmt!r}; choose auto, {', '.join(FORMATS)}")
    src = loaded if loaded is not None and fmt != "hf" else path  # hf needs the folder's config.json
    return readers[fmt](src, num_heads=num_heads, decoder_num_heads=decoder_num_heads)


def build(w: Weights) -> nn.Module:
    """Our model holding the weights (strict: every key and shape must fit), in eval mode."""
    model = build_mae(w.model) if w.arch == "mae" else build_vit(w.model, w.num_classes)
    try:
        model.load_state_dict(w.state)
    except RuntimeError as e:
        details = "; ".join(line.strip() for line in str(e).splitlines()[1:])
        raise MAEError(f"the weights do not fit mae-torch's {type(model).__name__}: {details}") from None
    return model.eval()


def load_pretrained(path: str | Path, fmt: str = "auto", num_heads: int | None = None, decoder_num_heads=None):
    """Any supported weights (a path or an hf-hub:ORG/NAME[@REVISION] reference) as our model: a
    MaskedAutoencoder if they have a decoder, else a ViT (+ head)."""
    return build(read(path, fmt, num_heads, decoder_num_heads))


# ---------------------------------------------------------------- writers


def description(w: Weights, arch: str | None = None) -> dict:
    """Our metadata for a file; arch "vit" describes the encoder of an MAE (no classes then)."""
    arch, model = arch or w.arch, w.model
    if arch == "vit":  # pooling as the keys hold it (an MAE's global_pool is its fine-tuning setting)
        model = replace(model, global_pool="avg" if "fc_norm.weight" in w.state else "cls")
    return {"arch": arch, "model": asdict(model), "classes": w.classes if arch == w.arch else None}


def output(dst: str | Path) -> Path:
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    return Path(dst)


def write_ours(w: Weights, dst: str | Path) -> Path:
    dst = output(dst if str(dst).endswith(".safetensors") else Path(dst) / "model.safetensors")
    dtype = next((v.dtype for v in w.state.values() if v.is_floating_point()), torch.float32)
    save_weights(build(w).to(dtype), description(w), dst)  # in the precision the weights came in
    return dst


def write_official(w: Weights, dst: str | Path) -> Path:
    """{"model": state dict} as the official code saves it; plain tensors and a JSON string only."""
    state = {k: v.contiguous() for k, v in w.state.items()}
    torch.save({"model": state, "mae_torch": json.dumps(description(w))}, output(dst))
    return Path(dst)


def write_timm(w: Weights, dst: str | Path) -> Path:
    """The encoder or classifier as a timm VisionTransformer state dict (the decoder is left out)."""
    state = {k: v.contiguous() for k, v in w.state.items() if not k.startswith(DECODER)}
    save_file(state, str(output(dst)), metadata={"format": "pt", "mae_torch": json.dumps(description(w, "vit"))})
    return Path(dst)


def hf_config(m: ModelConfig, **extra):
    """transformers' ViTMAEConfig of the same architecture (transformers is an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise MAEError("transformers' format needs transformers: pip install transformers") from None
    return transformers.ViTMAEConfig(
        **{theirs: getattr(m, ours) for theirs, ours in HF_CONFIG.items()},
        intermediate_size=int(m.mlp_ratio * m.embed_dim),
        decoder_intermediate_size=int(m.mlp_ratio * m.decoder_embed_dim),
        hidden_act="gelu",
        **extra,
    )


def write_hf(w: Weights, dst: str | Path) -> Path:
    """A save_pretrained folder: ViTMAEForPreTraining (with decoder) or ViTMAEModel (encoder)."""
    if w.arch == "vit" and (w.num_classes or "norm.weight" not in w.state):
        raise MAEError("transformers' ViTMAE has no classifier head or avg pooling; export this model with --to timm")
    config = hf_config(w.model)
    import transformers  # hf_config checked that it is installed

    m, dst = w.model, Path(dst)
    model = (transformers.ViTMAEForPreTraining if w.arch == "mae" else transformers.ViTMAEModel)(config)
    state = {}
    for key in model.state_dict():  # their names, whichever transformers version is installed
        ours, part = hf_key(key)
        state[key] = w.state[ours] if part is None else w.state[ours].chunk(3)[part]
    model.load_state_dict(state, strict=True)
    model.to(next((v.dtype for v in w.state.values() if v.is_floating_point()), torch.float32)).save_pretrained(dst)
    # transformers 5 saves the decoder's blocks as `decoder.decoder_encoder.layer.i` (its v4-name mapping applied
    # to `decoder_layers`), which transformers 4 cannot load; the hub's names load in both.
    saved = load_file(str(dst / "model.safetensors"))
    if any(".decoder_encoder.layer." in k for k in saved):
        saved = {k.replace(".decoder_encoder.layer.", ".decoder_layers."): v for k, v in saved.items()}
        save_file(saved, str(dst / "model.safetensors"), metadata={"format": "pt"})
    size = {"height": m.img_size, "width": m.img_size}  # the input normalization travels with the weights
    transformers.ViTImageProcessor(image_mean=list(m.mean), image_std=list(m.std), size=size).save_pretrained(dst)
    return dst


WRITERS = {"official": write_official, "hf": write_hf, "timm": write_timm, "ours": write_ours}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(
    src, src_format: str, dst, dst_format: str, num_heads: int | None = None, decoder_num_heads=None, dtype="keep"
) -> Path:
    """`mae convert`: read SRC in src_format ("auto" recognizes it), check it fits our model, write OUT with its
    floating-point tensors in `dtype` ("keep": as SRC stores them; float16 halves a file for sharing)."""
    if dst_format not in WRITERS:
        raise MAEError(f"unknown output format {dst_format!r}; choose one of {', '.join(FORMATS)}")
    if dtype != "keep" and dtype not in DTYPES:
        raise MAEError(f"unknown dtype {dtype!r}; choose keep or one of {', '.join(DTYPES)}")
    w = read(src, src_format, num_heads, decoder_num_heads)
    if dtype != "keep":
        w = w._replace(state={k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in w.state.items()})
    if dst_format != "ours":
        build(w)  # every key and shape must fit our model, whatever the output (write_ours builds it anyway)
    return WRITERS[dst_format](w, dst)
