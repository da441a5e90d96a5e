"""Where a training step's time goes: every ATen call of one `mae bench` step timed on its own, summed by
operator, with the matrix products' achieved TFLOP/s; before it, the wall time, CPU time, system time and
page faults of a few untimed steps.

    python scripts/profile_step.py [--preset cifar10-vit-tiny --batch 128 --precision auto --mode pretrain
                                    --design mae-torch|baseline --attention auto --steps 3 --top 20]

CPU only. Each call is timed as it runs (a `TorchDispatchMode` around the step), so the sum is close to the
step's own time; `torch.profiler` attributed two to three times more to some memory-bound calls (gelu_backward)
than they take (docs/benchmarks-log.md).
"""

import argparse
import resource
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mae_torch.bench import make_step, measured_peak
from mae_torch.runtime import keep_freed_memory, resolve_precision

MATMULS = {"aten.mm.default": (0, 1), "aten.addmm.default": (1, 2), "aten.bmm.default": (0, 1)}


class OpTimes(TorchDispatchMode):
    """Seconds and calls per ATen operator, and FLOPs of the matrix products."""

    def __init__(self):
        super().__init__()
        self.seconds, self.calls, self.flops = Counter(), Counter(), defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.seconds[name] += time.perf_counter() - t
        self.calls[name] += 1
        if name in MATMULS:
            a, b = (args[i] for i in MATMULS[name])
            self.flops[name] += 2 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cifar10-vit-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--mode", default="pretrain", choices=["pretrain", "finetune"])
    ap.add_argument("--design", default="mae-torch", choices=["mae-torch", "baseline"])
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "math"])
    ap.add_argument("--steps", type=int, default=3, help="untimed steps measured with getrusage")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    cpu = torch.device("cpu")
    precision = resolve_precision(a.precision, cpu) if a.design == "mae-torch" else "fp32"  # the baseline's
    if a.design == "mae-torch":
        keep_freed_memory()  # as training and `mae bench` do; the baseline keeps the C library's defaults
    step, _ = make_step(a.mode, a.preset, a.batch, cpu, precision, a.design, attention=a.attention)
    for _ in range(2):
        step()
    print(f"{a.design} {a.mode} {a.preset} batch {a.batch} {precision}")
    for _ in range(a.steps):
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        r1, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t
        print(
            f"untimed step: {seconds:.3f} s; CPU time {r1.ru_utime - r0.ru_utime:.2f} s user + "
            f"{r1.ru_stime - r0.ru_stime:.2f} s system; {r1.ru_minflt - r0.ru_minflt} page faults"
        )
    times = OpTimes()
    with times:
        step()
    print(f"ATen calls of the next step sum to {sum(times.seconds.values()):.3f} s")
    print(f"a large {precision} matrix product now: {measured_peak(cpu, precision):.3f} TFLOP/s")
    for name, s in times.seconds.most_common(a.top):
        rate = f"  {times.flops[name] / s / 1e12:.3f} TFLOP/s" if name in MATMULS else ""
        print(f"{s * 1e3:9.1f} ms  {times.calls[name]:5d} calls  {name}{rate}")


if __name__ == "__main__":
    main()
