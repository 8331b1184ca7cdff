"""The op benchmark: the fused op against PyTorch's own batch-norm backward, per BN shape.

For each configuration it times, on the same inputs (train mode, gradients of input, weight and
bias all requested):
  fused    gradstats::bn_backward_stats: the gradients plus statistics of dy and dx
  native   PyTorch's backward: cudnn_batch_norm_backward where nn.BatchNorm2d would use cuDNN
           (CUDA, cuDNN enabled), aten::native_batch_norm_backward otherwise
  unfused  native + torch.var_mean of dy and of dx: what backward hooks cost a user today
and, when asked (per_sample=True, `gradstats bench --per-sample`):
  per-sample  fused with per_sample=True: the gradients' per-sample terms on top, which must cost
              (nearly) nothing, as they ride on the pass that reads dy
(timing: gradstats.tools.bench.timing).

Bytes. A train-mode batch-norm backward must read dy and x to form its sums, then read them again
and write dx: 5 * numel * element_size bytes (the per-channel vectors are negligible). GB/s are
that count over the median time, for the fused and the native op alike; "% copy" compares it
with the bandwidth of a plain device copy (read + write) measured in the same run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ...ops import bn_backward_stats
from .timing import copy_bandwidth, time_interleaved

# BN layers (N, C, H, W) of a CIFAR ResNet-56 at batch 128: 16, 32 and 64 channels at 32, 16, 8 px.
RESNET56_CIFAR = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
# Distinct BN shapes (C, H = W) of a torchvision ResNet-50 at 224x224: stem, then per stage the
# 1x1 reduce, 3x3 and 1x1 expand layers (stride on the 3x3, as in torchvision).
RESNET50_SHAPES = [
    (64, 112),
    (64, 56),
    (256, 56),
    (128, 56),
    (128, 28),
    (512, 28),
    (256, 28),
    (256, 14),
    (1024, 14),
    (512, 14),
    (512, 7),
    (2048, 7),
]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resnet50_shapes(batch: int) -> list[tuple[int, int, int, int]]:
    return [(batch, c, s, s) for c, s in RESNET50_SHAPES]


PRESETS = {
    "resnet56-cifar": RESNET56_CIFAR,
    "resnet50": resnet50_shapes(32) + resnet50_shapes(64),
}


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
    per_sample_ms: float | None = None  # None: not timed
    per_sample_iqr_ms: float | None = None

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

    @property
    def per_sample_vs_fused(self) -> float | None:
        return None if self.per_sample_ms is None else self.per_sample_ms / self.fused_ms

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d.update(
            fused_gbps=self.fused_gbps,
            native_gbps=self.native_gbps,
            fused_pct_copy=self.fused_pct_copy,
            fused_vs_native=self.fused_vs_native,
            unfused_vs_fused=self.unfused_vs_fused,
            per_sample_vs_fused=self.per_sample_vs_fused,
        )
        return d


def _native_backward(dy, x, weight, mean, invstd, eps):
    """PyTorch's own backward for these inputs, as nn.BatchNorm2d would run it, and its name."""
    mask = [True, True, True]
    if x.is_cuda and torch.backends.cudnn.enabled and x.dtype != torch.float64:
        try:
            # cuDNN's backward needs the reserve space and the saved statistics of its forward.
            bias = torch.zeros_like(weight)
            _, save_mean, save_var, reserve = torch.ops.aten.cudnn_batch_norm(
                x, weight, bias, None, None, True, 0.0, eps
            )

            def cudnn():
                return torch.ops.aten.cudnn_batch_norm_backward(
                    x, dy, weight, None, None, save_mean, save_var, eps, reserve
                )

            cudnn()
            return cudnn, "cudnn"
        except RuntimeError:
            pass  # shape or layout cuDNN does not take: PyTorch falls back to its own kernel too

    def native():
        return torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, eps, mask
        )

    return native, "native"


def bench_shape(
    shape,
    dtype=torch.float32,
    channels_last=False,
    device="cpu",
    repeats=20,
    seed=0,
    copy_gbps: float | None = None,
    per_sample: bool = False,
) -> Row:
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
        return torch.var_mean(dy, dim=(0, 2, 3), correction=0), torch.var_mean(
            dx, dim=(0, 2, 3), correction=0
        )

    def fused_per_sample():
        return bn_backward_stats(dy, x, weight, mean, invstd, True, True, True)

    candidates = [fused, native, unfused] + ([fused_per_sample] if per_sample else [])
    times = time_interleaved(candidates, repeats, device)
    (f, fi), (n, ni), (u, ui) = times[:3]
    p, pi = times[3] if per_sample else (None, None)
    if copy_gbps is None:
        copy_gbps = copy_bandwidth(device)
    return Row(
        tuple(shape),
        str(dtype).replace("torch.", ""),
        "channels_last" if channels_last else "nchw",
        device.type,
        f,
        n,
        u,
        fi,
        ni,
        ui,
        5 * x.numel() * x.element_size(),
        copy_gbps,
        native_kind,
        p,
        pi,
    )


HEADER = (
    f"{'shape':<20} {'dtype':<9} {'layout':<13} {'fused ms':>16} {'native ms':>16} "
    f"{'unfused ms':>11} {'GB/s':>7} {'%copy':>6} {'fused/native':>12} {'unfused/fused':>13}"
)
# Appended to HEADER when the per-sample variant is timed.
PER_SAMPLE_HEADER = f" {'per-sample ms':>16} {'per-sample/fused':>16}"


def format_row(row: Row) -> str:
    shape = "x".join(map(str, row.shape))
    fused = f"{row.fused_ms:.3f}+-{row.fused_iqr_ms / 2:.3f}"
    native = f"{row.native_ms:.3f}+-{row.native_iqr_ms / 2:.3f}"
    line = (
        f"{shape:<20} {row.dtype:<9} {row.layout:<13} {fused:>16} {native:>16} {row.unfused_ms:>11.3f} "
        f"{row.fused_gbps:>7.1f} {row.fused_pct_copy:>5.0f}% {row.fused_vs_native:>12.3f} "
        f"{row.unfused_vs_fused:>13.2f}"
    )
    if row.per_sample_ms is not None:
        per_sample = f"{row.per_sample_ms:.3f}+-{row.per_sample_iqr_ms / 2:.3f}"
        line += f" {per_sample:>16} {row.per_sample_vs_fused:>16.3f}"
    return line
