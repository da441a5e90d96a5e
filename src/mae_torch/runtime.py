"""Where and how a step runs: device, precision, attention kernel, input normalization, loaders, safe writes.

Design decisions:
- `auto` everywhere means the measured fast path: bf16 autocast on GPUs and on CPUs with bf16 instructions
  (AVX-512 BF16 or AMX, on any OS; not when ONEDNN_MAX_CPU_ISA limits oneDNN below them); SDPA attention,
  except matmul + softmax on CPUs in bf16 (docs/benchmarks-log.md).
- Images travel as uint8 and are normalized on the device: a quarter of the bytes to move.
- On CPUs under glibc, freed memory stays in the process (`keep_freed_memory`): glibc otherwise maps every
  large tensor afresh and unmaps it when freed, so each step faults its activations in again page by page
  (about 0.8 million page faults and 2 s of system time per fp32 step of cifar10-vit-tiny at batch 128).
- Files are written to a temporary name, flushed to disk and renamed (`atomic_write`): a crash or a full
  disk leaves the previous file whole.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import MAEError


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)`, flush to disk, then rename: readers never see half a file, and a
    failed write (a full disk) leaves the previous file as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o644)  # shared weights are readable by others, whatever mode the writer chose
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        kept = f"the previous {path.name} is kept" if path.exists() else f"{path.name} was not written"
        raise MAEError(f"could not write {path} ({e.strerror or e}); {kept}: free some disk space, then resume") from e
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: nn.Module, meta: dict, path: Path) -> None:
    """Weights for sharing: safetensors, with the model description in its metadata and in a JSON beside it."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"mae_torch": json.dumps(meta)}))
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for reuse instead of returning it to the kernel (glibc on Linux only).

    Large allocations come from the heap instead of one mmap each (M_MMAP_MAX = 0) and free memory at the
    heap's top is kept up to 2 GiB (M_TRIM_THRESHOLD), as jemalloc and tcmalloc do: the peak memory of a
    training step is unchanged, the page faults of re-mapping it every step are gone (1.27-1.28x in fp32 on AVX2,
    docs/benchmarks-log.md). Returns whether it was applied: not on other C libraries, and not when the user
    chose an allocator setting (MALLOC_* or GLIBC_TUNABLES variables, or a preloaded allocator)."""
    own = any(k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD") for k in os.environ)
    if own or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def mps_available() -> bool:
    """An Apple GPU usable through PyTorch's MPS backend."""
    return torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """auto: a CUDA GPU, else an Apple GPU (MPS), else the CPU; an unavailable device is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MAEError(f"device {name} asked for but CUDA is not available; use --device cpu")
    if name.startswith("mps") and not mps_available():
        raise MAEError(f"device {name} asked for but no Apple GPU (MPS) is available; use --device cpu")
    return torch.device(name)


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which its bf16 matrix products are emulated, not native
ISAS_WITHOUT_BF16 = frozenset(
    "SSE41 AVX AVX2 AVX2_VNNI AVX512_CORE AVX512_CORE_VNNI AVX512_MIC AVX512_MIC_4OPS".split()
)


CPU_FEATURES = ("avx2", "avx512", "avx512_bf16", "amx_tile")  # as PyTorch names them: torch.cpu._is_NAME_supported


def cpu_features() -> set[str]:
    """Which of CPU_FEATURES this CPU has: PyTorch's detection (any OS), else the flags of /proc/cpuinfo."""
    checks = {name: getattr(torch.cpu, f"_is_{name}_supported", None) for name in CPU_FEATURES}
    if all(checks.values()):
        return {name for name, check in checks.items() if check()}
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()
    return {name for name in CPU_FEATURES if {"avx512": "avx512f"}.get(name, name) in flags}


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AVX-512 BF16 or AMX), where bf16 autocast pays off. False
    when oneDNN, which runs the bf16 matrix products, is limited to an older instruction set
    (ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA)."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return limit.upper() not in ISAS_WITHOUT_BF16 and bool(cpu_features() & {"avx512_bf16", "amx_tile"})


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that have it (else fp16 with loss scaling) and on CPUs with bf16 instructions; fp32
    on Apple GPUs, where autocast covers fewer operations (`--precision fp16` asks for it there)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def resolve_attention(name: str, device: torch.device, precision: str = "fp32") -> str:
    """auto: SDPA, except on CPUs in bf16, where matmul + softmax measured faster (docs/benchmarks-log.md: 1.3x
    with AMX, 40.2 against 31.1 img/s with AVX-512 BF16); in fp32 SDPA is the faster one on CPUs too (22.6
    against 11.0 img/s on the AVX-512 BF16 CPU)."""
    if name != "auto":
        return name
    return "math" if device.type == "cpu" and precision == "bf16" else "sdpa"


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


class Normalizer:
    """uint8 images -> normalized floats on the device (cheaper than converting on the host)."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.mean.device, non_blocking=True).float() - self.mean) / self.std


def make_loader(
    ds: Dataset, batch: int, workers: int, device: torch.device, order=None, drop_last: bool = False
) -> DataLoader:
    """Batches of `ds` in the given order of indices (default: all, in order)."""
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=order,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=torch.Generator(),  # its own: drawing worker seeds must not shift the training RNG stream
    )


def load_state(module: nn.Module, state: dict, what: str) -> None:
    """load_state_dict(strict=True), with a mismatch reported as one line that lists the keys at fault."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:

        def few(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        parts = [
            f"missing {few(missing)}" if missing else "",
            f"unexpected {few(unexpected)}" if unexpected else "",
            f"shapes differ: {few(shapes)}" if shapes else "",
        ]
        raise MAEError(f"{what} does not fit this model (another architecture?): " + "; ".join(p for p in parts if p))
    module.load_state_dict(state)
