"""Shared test helpers: devices (CUDA cases skip cleanly without a GPU), dtypes, tolerances and
random inputs."""

from __future__ import annotations

import json
import os
import zlib

import pytest
import torch

import gradstats

# GRADSTATS_CUDA_EMU=1 (set by scripts/cuda_emulator.sh): the CUDA kernels run on the CPU under
# the emulator, installed as the CPU kernels of torch.ops.gradstats for this process. The "cuda"
# cases then run on CPU tensors through the CUDA source; cases that need a real device skip.
CUDA_EMULATED = os.environ.get("GRADSTATS_CUDA_EMU") == "1"
if CUDA_EMULATED:
    import gradstats_cuda_emu

    gradstats_cuda_emu.install_as_cpu_kernels()
CUDA_DEVICE_PRESENT = torch.cuda.is_available() and gradstats.cuda_kernels_built()
CUDA = CUDA_DEVICE_PRESENT or CUDA_EMULATED
# The device the "cuda" cases put their tensors on.
CUDA_DEVICE = "cpu" if CUDA_EMULATED else "cuda"

_SKIP_WITHOUT_CUDA = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA device and the CUDA build, or the emulator"
)
_SKIP_WITHOUT_DEVICE = pytest.mark.skipif(
    not CUDA_DEVICE_PRESENT, reason="needs a CUDA device and the CUDA build"
)

# Emulated, every CPU op call runs the CUDA kernels: the one "cuda" case is the CPU device.
DEVICES = (
    [pytest.param(CUDA_DEVICE, id="cuda", marks=[pytest.mark.cuda])]
    if CUDA_EMULATED
    else ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _SKIP_WITHOUT_CUDA])]
)


def needs_cuda(test):
    """Marks a test that needs a real CUDA device and gradstats' CUDA kernels."""
    return pytest.mark.cuda(_SKIP_WITHOUT_DEVICE(test))


FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Relative tolerance per storage dtype, against the float64 reference. Errors are measured
# against the magnitude of the terms that were summed or subtracted (see assert_close_scaled),
# which is what rounding is proportional to.
#   float64: 1e-10 - sums of up to ~1e5 terms at eps 1.1e-16, with a wide margin.
#   float32: 2e-5  - chunks of <= 8192 values in float32 (eps 6e-8): worst case 512 terms per
#                    lane ~ 3e-5, typically far less; chunks merge in float64.
#   float16: 2e-3  - grad_input is rounded to float16 (unit roundoff 4.9e-4) and its inputs dy, x
#                    are float16 values; accumulation is float32.
#   bfloat16: 1.6e-2 - the same with a unit roundoff of 3.9e-3.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def subnormal_spacing(dtype: torch.dtype) -> float:
    """Spacing of a dtype's subnormal numbers: the rounding error of a tiny value stored in it."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seed_for(*parts) -> int:
    """A fixed seed per test case, so every case draws its own data reproducibly."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def assert_close_scaled(actual, expected, scale, tol, what, atol=0.0):
    """|actual - expected| <= tol * scale + atol elementwise (scale broadcastable), after
    printing the worst and mean error relative to scale. atol covers values rounded into a
    storage type's subnormal range, where spacing is absolute."""
    actual = actual.double()
    expected = expected.double()
    scale = torch.as_tensor(scale, dtype=torch.float64, device=expected.device)
    err = ((actual - expected).abs() - atol).clamp_min(0) / scale.clamp_min(1e-300)
    print(f"{what}: max rel err {err.max().item():.3e}, mean {err.mean().item():.3e} (tol {tol:.1e})")
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: finiteness differs"
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} values off by more than {tol:.1e} x scale; "
        f"worst {err.max().item():.3e}"
    )


def make_bn_inputs(
    shape,
    dtype,
    device,
    *,
    channels_last=False,
    affine=True,
    seed=0,
    dy_offset=0.5,
    x_scale=3.0,
    x_offset=1.0,
):
    """Random (dy, x, weight, mean, invstd) as the forward of a batch norm would save them:
    mean and invstd are the batch statistics of x (computed in float64, stored in the
    accumulation dtype)."""
    g = torch.Generator().manual_seed(seed)
    acc = accumulation_dtype(dtype)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * x_scale + x_offset).to(dtype)
    dy = (torch.randn(shape, generator=g, dtype=torch.float64) + dy_offset).to(dtype)
    channels = shape[1]
    weight = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).to(acc) if affine else None
    x64 = x.double()
    mean = x64.mean((0, 2, 3))
    var = x64.var((0, 2, 3), correction=0)
    invstd = (var + 1e-5).rsqrt()
    tensors = [dy, x, weight, mean.to(acc), invstd.to(acc)]
    tensors = [None if t is None else t.to(device) for t in tensors]
    if channels_last:
        tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
        tensors[1] = tensors[1].contiguous(memory_format=torch.channels_last)
    return tensors


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests: tiny models run as fast on one, and far faster
    when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_error(argv, capsys) -> str:
    """Runs `gradstats ARGV`, which must exit with status 2 (a usage or input error); returns
    what it wrote to stderr."""
    from gradstats.tools.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def read_records(folder) -> list[dict]:
    """The records of a `gradstats train` run: FOLDER/stats.jsonl, one JSON object per line."""
    with open(os.path.join(folder, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchvision_or_skip():
    """torchvision, or a skip when it does not import (missing, or built for another torch,
    which raises RuntimeError)."""
    try:
        import torchvision
    except Exception as error:
        pytest.skip(f"torchvision does not import: {error}")
    return torchvision


def global_batches(steps: int, samples: int) -> list:
    """``steps`` global batches of ``samples`` float64 3x12x12 images (offset 0.3) and labels in
    [0, 5), seeded: the same in every process of a distributed test."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(samples, 3, 12, 12, generator=g, dtype=torch.float64) + 0.3,
            torch.randint(0, 5, (samples,), generator=g),
        )
        for _ in range(steps)
    ]


def train_quietly(**config):
    """`gradstats train` in this process on the CPU with ``config`` (TrainConfig fields), no
    progress bar, no TensorBoard, no log lines; returns the run's summary."""
    from gradstats.tools import trainer

    quiet = dict(progress=False, tensorboard=False, device="cpu")
    return trainer.train(trainer.TrainConfig(**quiet | config), log=lambda *a: None)
