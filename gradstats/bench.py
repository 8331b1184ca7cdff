"""Microbenchmark of the fused op against PyTorch's own batch-norm backward.

For one batch-norm shape it times, on the same inputs:
  fused    gradstats::bn_backward_stats (gradients + statistics of dy and dx)
  native   aten::native_batch_norm_backward (gradients only)
  unfused  native + torch.var_mean of dy and of dx: what backward hooks cost a user today

Timing: whole calls with time.perf_counter on CPU (torch.cuda.synchronize around them on GPU),
after warm-up; the three candidates are interleaved round by round, in an order rotated every
round, so drifts of the machine (frequency, other processes) and cache state left by the
previous call hit them alike; the median of the rounds is reported with the interquartile range.

CPU allocations: each candidate allocates its outputs (dx alone is as large as the input). glibc
returns large blocks to the OS and page-faults them back in on first touch, at a cost that
depends on what ran before (it swung PyTorch's own backward between 0.8 and 4.9 ms for one
8 MB shape here). steady_allocator() keeps freed memory in the process, so repeated calls
measure the kernels; it applies to every candidate alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .ops import bn_backward_stats

# BN layers (N, C, H, W) of a CIFAR ResNet-56 at batch 128: 16, 32 and 64 channels at 32, 16, 8 px.
RESNET56_CIFAR = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
# Distinct BN shapes of a torchvision ResNet-50 at 224x224 (stem, and 1x1/3x3/expansion layers).
RESNET50_SHAPES = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
                   (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]


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


def resnet50_shapes(batch: int) -> list[tuple[int, int, int, int]]:
    return [(batch, c, s, s) for c, s in RESNET50_SHAPES]


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

    @property
    def fused_vs_native(self) -> float:
        return self.fused_ms / self.native_ms

    @property
    def unfused_vs_fused(self) -> float:
        return self.unfused_ms / self.fused_ms

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["fused_vs_native"] = self.fused_vs_native
        d["unfused_vs_fused"] = self.unfused_vs_fused
        return d


def _time_interleaved(fns: list[Callable[[], object]], repeats: int, device: torch.device,
                      warmup: int = 3) -> list[tuple[float, float]]:
    """(median, interquartile range) in ms of each fn, measured round-robin."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        # Rotate the order every round: a candidate that always ran right after another would
        # find that one's inputs (the same tensors) in cache.
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            fn = fns[i]
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append((time.perf_counter() - start) * 1e3)
    out = []
    for t in times:
        q = statistics.quantiles(t, n=4) if len(t) >= 4 else [min(t), 0, max(t)]
        out.append((statistics.median(t), q[2] - q[0]))
    return out


def bench_shape(shape, dtype=torch.float32, channels_last=False, device="cpu", repeats=20,
                seed=0) -> Row:
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    channels = shape[1]
    weight = torch.rand(channels, generator=g).add(0.5).to(device=device, dtype=acc)
    x64 = x.to(acc)
    mean = x64.mean((0, 2, 3))
    invstd = (x64.var((0, 2, 3), correction=0) + 1e-5).rsqrt()
    del x64
    mask = [True, True, True]

    def fused():
        return bn_backward_stats(dy, x, weight, mean, invstd, True, True)

    def native():
        return torch.ops.aten.native_batch_norm_backward(dy, x, weight, None, None, mean, invstd,
                                                         True, 1e-5, mask)

    def unfused():
        dx = native()[0]
        return torch.var_mean(dy, dim=(0, 2, 3), correction=0), torch.var_mean(dx, dim=(0, 2, 3), correction=0)

    (f, fi), (n, ni), (u, ui) = _time_interleaved([fused, native, unfused], repeats, device)
    return Row(tuple(shape), str(dtype).replace("torch.", ""), "channels_last" if channels_last else "nchw",
               device.type, f, n, u, fi, ni, ui)


def geometric_mean(values: list[float]) -> float:
    return statistics.geometric_mean(values) if values else float("nan")
