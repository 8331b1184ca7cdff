"""Property-based fuzzing of gradstats::bn_backward_stats and channel_moments against the float64
reference (hypothesis).

Profiles (HYPOTHESIS_PROFILE): "ci", the default, runs 2,000 examples of the main property in
well under a minute on 2 CPU cores; "thorough" runs 50,000 (about 15 minutes):
    HYPOTHESIS_PROFILE=thorough pytest tests/test_fuzz.py
Every example: random shape (primes, H = W = 1, up to 1,000 channels, N*H*W down to 2), dtype,
layout or arbitrary strides (sliced, permuted, expanded), train/eval, affine or not, value scales
over many orders of magnitude and per-channel offsets up to 1e4 standard deviations.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import CUDA, CUDA_DEVICE, CUDA_EMULATED, TOL, accumulation_dtype
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_op import check_against_reference

from gradstats.ops import bn_backward_stats, channel_moments
from gradstats.reference import bn_backward_formula
from gradstats.reference import channel_moments as reference_moments

# ci: the default run; thorough: on demand; sanitize: under AddressSanitizer
# (scripts/sanitize.sh), where everything runs a few times slower.
for _name, _examples, _derandomize in (
    ("ci", 2000, True),
    ("thorough", 50000, False),
    ("sanitize", 300, True),
):
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        derandomize=_derandomize,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Largest |value| a dtype's tests use, keeping clear of overflow in storage (float16: 65504) and
# of overflow of the squares the float32 accumulators take.
MAX_MAGNITUDE = {torch.float64: 1e30, torch.float32: 1e15, torch.bfloat16: 1e15, torch.float16: 3e3}

# Emulated, an NCHW channel costs a block of 512 threads (fibers) per kernel: wide layers are
# drawn at widths that keep 2,000 examples within minutes, still past a 32-lane tile.
WIDE_CHANNELS = [31, 33, 64] if CUDA_EMULATED else [64, 127, 256, 300, 1000]

sizes = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 11, 13, 17, 31, 64]), st.integers(1, 40))


@st.composite
def problems(draw):
    n, h, w = draw(sizes), draw(sizes), draw(sizes)
    channels = draw(st.one_of(st.integers(1, 24), st.sampled_from(WIDE_CHANNELS)))
    # keep an example small: at most ~60k values
    while n * h * w * channels > 60_000:
        n, h, w = max(1, n // 2), max(1, h // 2), max(1, w // 2)
    training = draw(st.booleans())
    if training and n * h * w < 2:
        n = 2
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["nchw", "channels_last", "sliced", "permuted", "expanded", "mixed"]))
    scale_exp = draw(st.floats(-6, math.log10(MAX_MAGNITUDE[dtype]) - 4))
    offset = draw(st.sampled_from([0.0, 0.0, 1.0, 1e2, 1e4]))
    x_offset = draw(st.sampled_from([0.0, 3.0, 1e3]))
    affine = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return (n, channels, h, w), dtype, layout, 10.0**scale_exp, offset, x_offset, training, affine, seed


def _materialise(shape, dtype, layout, scale, offset, x_offset, seed, device):
    """dy and x with the requested strides, values of size `scale`, and per-channel offsets of up
    to `offset` standard deviations in dy."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    big = (n, c, h + 1, 2 * w) if layout == "sliced" else (n, c, w, h) if layout == "permuted" else shape

    def draw(offset_sd):
        t = torch.randn(big, generator=g, dtype=torch.float64)
        shifts = torch.linspace(-offset_sd, offset_sd, c, dtype=torch.float64).reshape(1, c, 1, 1)
        return ((t + shifts) * scale).to(dtype)

    dy, x = draw(offset), draw(x_offset)
    if layout == "sliced":
        dy, x = dy[:, :, 1:, ::2], x[:, :, :-1, 1::2]
    elif layout == "permuted":
        dy, x = dy.transpose(2, 3), x.transpose(2, 3)
    elif layout == "expanded":  # one sample repeated N times: stride 0 along N
        dy = dy[:1].expand(n, c, h, w)
    elif layout == "channels_last":
        dy, x = (
            dy.contiguous(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    elif layout == "mixed":
        x = x.contiguous(memory_format=torch.channels_last)
    return dy.to(device), x.to(device)


def _params(x, affine, seed, device):
    acc = accumulation_dtype(x.dtype)
    g = torch.Generator().manual_seed(seed + 1)
    channels = x.shape[1]
    weight = (
        (torch.rand(channels, generator=g, dtype=torch.float64) * 2 - 1).to(acc).to(device)
        if affine
        else None
    )
    x64 = x.double()
    mean = x64.mean((0, 2, 3))
    invstd = (x64.var((0, 2, 3), correction=0) + 1e-5 * x64.abs().amax().clamp_min(1e-30) ** 2).rsqrt()
    return weight, mean.to(acc), invstd.to(acc)


def _run(problem, device):
    shape, dtype, layout, scale, offset, x_offset, training, affine, seed = problem
    dy, x = _materialise(shape, dtype, layout, scale, offset, x_offset, seed, device)
    weight, mean, invstd = _params(x, affine, seed, device)
    # A dx beyond the storage type's range is stored as inf, by PyTorch as by us; that path is
    # tested on its own (test_nonfinite.py), here the values must be representable.
    reference_dx = bn_backward_formula(
        dy.double(),
        x.double(),
        None if weight is None else weight.double(),
        mean.double(),
        invstd.double(),
        training,
    )[0]
    assume(bool(reference_dx.abs().max() < torch.finfo(dtype).max / 2))
    out = bn_backward_stats(dy, x, weight, mean, invstd, training, True)
    check_against_reference(out, dy, x, weight, mean, invstd, training, True, dtype)
    # channel_moments on the same data: the probes' kernel
    stats = channel_moments(dy)
    ref = reference_moments(dy)
    assert torch.equal(stats[0].cpu(), ref[0]) and torch.equal(stats[3].cpu(), ref[3])
    var, ref_var = stats[2] / stats[0], ref[2] / ref[0]
    reference_rounding = 16 * (torch.finfo(torch.float64).eps * dy.double().abs().mean()).item() ** 2
    assert torch.allclose(var.cpu(), ref_var, rtol=TOL[dtype], atol=reference_rounding)


@pytest.mark.skipif(CUDA_EMULATED, reason="the CPU kernels are replaced by the emulated CUDA ones here")
@given(problems())
def test_fuzz_against_reference_cpu(problem):
    _run(problem, "cpu")


# On a GPU: 500 examples. Emulated: the profile's 2,000, each planned for 1, 2 or 132
# multiprocessors (1 and 2 give several blocks per channel on small shapes).
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA build, or the emulator")
@settings(max_examples=settings().max_examples if CUDA_EMULATED else 500)
@given(problems(), st.sampled_from([1, 2, 132]))
def test_fuzz_against_reference_cuda(problem, num_sms):
    if CUDA_EMULATED:
        import gradstats_cuda_emu

        with gradstats_cuda_emu.num_sms(num_sms):
            _run(problem, CUDA_DEVICE)
    else:
        _run(problem, CUDA_DEVICE)
