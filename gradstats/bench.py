"""`gradstats bench`: the fused op against PyTorch's own batch-norm backward, per BN shape.

For each configuration it times, on the same inputs (train mode, gradients of input, weight and
bias all requested):
  fused    gradstats::bn_backward_stats: the gradients plus statistics of dy and dx
  native   PyTorch's backward: cudnn_batch_norm_backward where nn.BatchNorm2d would use cuDNN
           (CUDA, cuDNN enabled), aten::native_batch_norm_backward otherwise
  unfused  native + torch.var_mean of dy and of dx: what backward hooks cost a user today

Timing. CPU: whole calls with time.perf_counter after warm-up. CUDA: CUDA events around each
call, with the L2 cache flushed (a buffer twice its size overwritten) before every call. The
three candidates run round by round in an order rotated every round, so drifts of the machine
and cache state left by the previous call hit them alike; medians over the rounds are reported
with the interquartile range.

CPU allocations: every candidate allocates its outputs (dx alone is as large as the input).
glibc returns large blocks to the OS and page-faults them back in on first touch, at a cost that
depends on what ran before (it swung PyTorch's own backward between 0.8 and 4.9 ms for one 8 MB
shape here). steady_allocator() keeps freed memory in the process so repeated calls measure the
kernels; it applies to every candidate alike.

Bytes. A train-mode batch-norm backward must read dy and x to form its sums, then read them again
and write dx: 5 * numel * element_size bytes (the per-channel vectors are negligible). GB/s are
that count over the median time, for the fused and the native op alike; "% copy" compares it
with the bandwidth of a plain device copy (read + write) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .distributed import check_min, resolve_device
from .ops import bn_backward_stats, cpu_capability

# BN layers (N, C, H, W) of a CIFAR ResNet-56 at batch 128: 16, 32 and 64 channels at 32, 16, 8 px.
RESNET56_CIFAR = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
# Distinct BN shapes (C, H = W) of a torchvision ResNet-50 at 224x224: stem, then per stage the
# 1x1 reduce, 3x3 and 1x1 expand layers (stride on the 3x3, as in torchvision).
RESNET50_SHAPES = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
                   (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def resnet50_shapes(batch: int) -> list[tuple[int, int, int, int]]:
    return [(batch, c, s, s) for c, s in RESNET50_SHAPES]


PRESETS = {
    "resnet56-cifar": RESNET56_CIFAR,
    "resnet50": resnet50_shapes(32) + resnet50_shapes(64),
}


def steady_allocator() -> bool:
    """Stop glibc from unmapping freed memory (large mmap threshold and trim threshold), so
    outputs reuse warm pages instead of page-faulting. Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):
        return False


@dataclass
class Row:
    shape: tuple[int, int, int, int]
    dtype: str
    layout: str
    device: str
    fused_ms: float
    native_ms: float
    unfused_ms: float
    fused_iqr_ms: float
    native_iqr_ms: float
    unfused_iqr_ms: float
    bytes: int
    copy_gbps: float
    native_kind: str

    @property
    def fused_gbps(self) -> float:
        return self.bytes / self.fused_ms / 1e6

    @property
    def native_gbps(self) -> float:
        return self.bytes / self.native_ms / 1e6

    @property
    def fused_pct_copy(self) -> float:
        return 100 * self.fused_gbps / self.copy_gbps

    @property
    def fused_vs_native(self) -> float:
        return self.fused_ms / self.native_ms

    @property
    def unfused_vs_fused(self) -> float:
        return self.unfused_ms / self.fused_ms

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d.update(fused_gbps=self.fused_gbps, native_gbps=self.native_gbps,
                 fused_pct_copy=self.fused_pct_copy,
                 fused_vs_native=self.fused_vs_native, unfused_vs_fused=self.unfused_vs_fused)
        return d


class _Timer:
    """Times calls on one device: perf_counter on CPU, CUDA events (after an L2 flush) on GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flush = None
        if device.type == "cuda":
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Milliseconds one call of fn takes."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        self.flush.zero_()  # evict L2, so every call starts from memory as in a training step
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)


def time_interleaved(fns: list[Callable[[], object]], repeats: int, device: torch.device,
                     warmup: int = 3) -> list[tuple[float, float]]:
    """(median, interquartile range) in ms of each fn, measured round-robin in rotating order."""
    timer = _Timer(device)
    for fn in fns:
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            times[i].append(timer(fns[i]))
    out = []
    for t in times:
        if len(t) >= 4:
            q1, _, q3 = statistics.quantiles(t, n=4)
            spread = q3 - q1
        else:  # too few rounds for quartiles: the whole range
            spread = max(t) - min(t)
        out.append((statistics.median(t), spread))
    return out


def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """GB/s of a device copy of 256 MB (counting the read and the write)."""
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ((median, _),) = time_interleaved([lambda: dst.copy_(src)], repeats, device)
    return 2 * n / median / 1e6


def _native_backward(dy, x, weight, mean, invstd, eps):
    """PyTorch's own backward for these inputs, as nn.BatchNorm2d would run it, and its name."""
    mask = [True, True, True]
    if x.is_cuda and torch.backends.cudnn.enabled and x.dtype != torch.float64:
        try:
            # cuDNN's backward needs the reserve space and the saved statistics of its forward.
            bias = torch.zeros_like(weight)
            _, save_mean, save_var, reserve = torch.ops.aten.cudnn_batch_norm(
                x, weight, bias, None, None, True, 0.0, eps)

            def cudnn():
                return torch.ops.aten.cudnn_batch_norm_backward(
                    x, dy, weight, None, None, save_mean, save_var, eps, reserve)

            cudnn()
            return cudnn, "cudnn"
        except RuntimeError:
            pass  # shape or layout cuDNN does not take: PyTorch falls back to its own kernel too

    def native():
        return torch.ops.aten.native_batch_norm_backward(dy, x, weight, None, None, mean, invstd,
                                                         True, eps, mask)

    return native, "native"


def bench_shape(shape, dtype=torch.float32, channels_last=False, device="cpu", repeats=20, seed=0,
                copy_gbps: float | None = None) -> Row:
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    channels = shape[1]
    weight = torch.rand(channels, generator=g).add(0.5).to(device=device, dtype=acc)
    x_acc = x.to(acc)
    mean = x_acc.mean((0, 2, 3))
    eps = 1e-5
    invstd = (x_acc.var((0, 2, 3), correction=0) + eps).rsqrt()
    del x_acc
    native, native_kind = _native_backward(dy, x, weight, mean, invstd, eps)

    def fused():
        return bn_backward_stats(dy, x, weight, mean, invstd, True, True)

    def unfused():
        dx = native()[0]
        return torch.var_mean(dy, dim=(0, 2, 3), correction=0), torch.var_mean(dx, dim=(0, 2, 3), correction=0)

    (f, fi), (n, ni), (u, ui) = time_interleaved([fused, native, unfused], repeats, device)
    if copy_gbps is None:
        copy_gbps = copy_bandwidth(device)
    return Row(tuple(shape), str(dtype).replace("torch.", ""), "channels_last" if channels_last else "nchw",
               device.type, f, n, u, fi, ni, ui, 5 * x.numel() * x.element_size(), copy_gbps, native_kind)


def geometric_mean(values: list[float]) -> float:
    return statistics.geometric_mean(values) if values else float("nan")


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"gradstats CPU kernels {cpu_capability()}")


def git_commit() -> str | None:
    try:
        # From gradstats' own folder: the checkout it was built from, not the caller's directory.
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- command line ---------------------------------------------------------------------------------

HEADER = (f"{'shape':<20} {'dtype':<9} {'layout':<13} {'fused ms':>16} {'native ms':>16} "
          f"{'unfused ms':>11} {'GB/s':>7} {'%copy':>6} {'fused/native':>12} {'unfused/fused':>13}")


def format_row(row: Row) -> str:
    shape = "x".join(map(str, row.shape))
    fused = f"{row.fused_ms:.3f}+-{row.fused_iqr_ms / 2:.3f}"
    native = f"{row.native_ms:.3f}+-{row.native_iqr_ms / 2:.3f}"
    return (f"{shape:<20} {row.dtype:<9} {row.layout:<13} {fused:>16} {native:>16} {row.unfused_ms:>11.3f} "
            f"{row.fused_gbps:>7.1f} {row.fused_pct_copy:>5.0f}% {row.fused_vs_native:>12.3f} "
            f"{row.unfused_vs_fused:>13.2f}")


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape expects N,C,H,W of positive integers, got {text!r}")
    return dims  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="BN shapes of a network: resnet56-cifar (batch 128), resnet50 (batch 32 and 64); repeatable")
    parser.add_argument("--shape", action="append", type=_shape, metavar="N,C,H,W", help="a shape to time; repeatable")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--channels-last", action="store_true", help="channels_last tensors (default: contiguous NCHW)")
    parser.add_argument("--both-layouts", action="store_true", help="time NCHW and channels_last")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per configuration (median reported)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the summary as JSON")
    parser.add_argument("--e2e", action="store_true",
                        help="instead: one training step of a CIFAR ResNet-56 (batch 128) plain, instrumented, and with hooks")
    parser.add_argument("--steps", type=int, default=10, help="--e2e: timed steps per variant")


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_min(args, ("repeats", "steps"), 1)
    if device.type == "cpu":
        steady_allocator()
    if args.e2e:
        from .bench_e2e import run_e2e

        return run_e2e(device, args.steps, args.json)

    shapes = [s for name in (args.preset or []) for s in PRESETS[name]] + list(args.shape or [])
    if not shapes:
        shapes = PRESETS["resnet56-cifar"]
    layouts = [False, True] if args.both_layouts else [args.channels_last]
    dtype = DTYPES[args.dtype]
    copy = copy_bandwidth(device)
    machine = machine_description(device)
    print(f"{machine}; copy bandwidth {copy:.1f} GB/s")
    print(HEADER)
    configs = [(s, cl) for s in shapes for cl in layouts]
    rows = []
    progress = None
    if len(configs) > 4:
        from tqdm import tqdm

        # disable=None: no bar when the output is not a terminal (logs stay clean)
        progress = tqdm(total=len(configs), desc="bench", leave=False, unit="config", disable=None)
    for shape, channels_last in configs:
        row = bench_shape(shape, dtype, channels_last, device, args.repeats, copy_gbps=copy)
        rows.append(row)
        line = format_row(row)
        if progress is not None:
            progress.write(line)
            progress.update()
        else:
            print(line)
    if progress is not None:
        progress.close()
    summary = {
        "fused_vs_native_geomean": geometric_mean([r.fused_vs_native for r in rows]),
        "unfused_vs_fused_geomean": geometric_mean([r.unfused_vs_fused for r in rows]),
        "fused_pct_copy_geomean": geometric_mean([r.fused_pct_copy for r in rows]),
    }
    print(f"geometric mean over {len(rows)} configurations: fused/native {summary['fused_vs_native_geomean']:.3f}, "
          f"unfused/fused {summary['unfused_vs_fused_geomean']:.2f}, fused at {summary['fused_pct_copy_geomean']:.0f}% "
          f"of copy bandwidth")
    if args.json:
        payload = {"machine": machine, "commit": git_commit(),
                   "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy, "repeats": args.repeats,
                   "rows": [r.as_dict() for r in rows], "summary": summary}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    return 0
