"""Timing for the benchmarks: interleaved rounds with medians, the device copy bandwidth, and
what a result file records about the machine and the checkout.

Timing. CPU: whole calls with time.perf_counter after warm-up. CUDA: CUDA events around each
call, with the L2 cache flushed (a buffer twice its size overwritten) before every call. The
candidates run round by round in an order rotated every round, so drifts of the machine and
cache state left by the previous call hit them alike; medians over the rounds are reported with
the interquartile range.

CPU allocations: glibc returns large freed blocks to the OS (blocks above its mmap threshold,
and the free top of its heap beyond the trim threshold) and page-faults them back in on first
touch, at a cost that depends on what ran before. Training processes run with glibc's defaults,
so the benchmarks do too; steady_allocator() (`gradstats bench --steady-allocator`, off by
default) keeps freed memory in the process instead, for measuring the kernels without that
noise. Either way it applies to every candidate alike, and the output says which was used.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from ...ops import cpu_capability


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


ALLOCATOR_LABELS = {
    False: "default (glibc as the environment configures it, as in a training process)",
    True: "steady (steady_allocator(): freed memory kept in the process)",
}


def time_rounds(
    fns: list[Callable[[], object]], repeats: int, device: torch.device, warmup: int = 3
) -> list[list[float]]:
    """Per fn, its time in ms in each round: fns run round-robin in an order rotated every round,
    so times[i][r] and times[j][r] were measured next to each other."""
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
    return times


def quartiles(values: list[float]) -> tuple[float, float]:
    """(first, third) quartile; the whole range when there are too few values for quartiles."""
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        return q1, q3
    return min(values), max(values)


def time_interleaved(
    fns: list[Callable[[], object]], repeats: int, device: torch.device, warmup: int = 3
) -> list[tuple[float, float]]:
    """(median, interquartile range) in ms of each fn, measured round-robin in rotating order."""
    out = []
    for t in time_rounds(fns, repeats, device, warmup):
        q1, q3 = quartiles(t)
        out.append((statistics.median(t), q3 - q1))
    return out


def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """GB/s of a device copy of 256 MB (counting the read and the write)."""
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ((median, _),) = time_interleaved([lambda: dst.copy_(src)], repeats, device)
    return 2 * n / median / 1e6


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
    return (
        f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"gradstats CPU kernels {cpu_capability()}"
    )


def git_commit() -> str | None:
    try:
        # From gradstats' own folder: the checkout it was built from, not the caller's directory.
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
