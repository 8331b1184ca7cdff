"""gradstats::bn_backward_stats(..., per_sample=True): the per-sample terms of grad_bias and
grad_weight ([2, N, C]) against the float64 reference, and what the flag must leave alone.

The shapes reach every way the kernels cut a sample: NCHW rows longer than a chunk and chunks
spanning rows; channels_last samples split between parts (at a part's first or last row, or
spanning several parts), two channel blocks, and the [N][C] matrix of H = W = 1.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICES,
    FLOAT_DTYPES,
    TOL,
    accumulation_dtype,
    assert_close_scaled,
    make_bn_inputs,
    seed_for,
)
from test_op import SHAPES, check_against_reference

from gradstats.ops import bn_backward_stats
from gradstats.reference import per_sample_reference

EXTRA_SHAPES = [
    (2, 3, 100, 100),  # NCHW: H*W > 8192, a chunk ends inside a row and the next spans two rows
    (20, 2, 64, 64),  # NCHW: two parts (tasks) per channel
    (5, 8, 45, 45),  # channels_last: samples split at part edges, both slots of a part
    (3, 600, 7, 7),  # channels_last: two channel blocks (the second with a scalar tail), split samples
    (1, 3, 100, 100),  # N = 1: the one sample spans every part
    (300, 40, 1, 1),  # the [N][C] matrix: one row per sample, three parts
]
ALL_SHAPES = SHAPES + EXTRA_SHAPES
MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


def _abs_sums(dy, x, mean, invstd):
    """[2, N, C] float64 sums of |terms| per sample: what the rounding of each sum scales with."""
    dy64, x64 = dy.double(), x.double()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x64 - mean.double().reshape(shape)) * invstd.double().reshape(shape)
    terms = torch.stack([dy64.abs(), (dy64 * x_hat).abs()])
    return terms.sum(tuple(range(3, terms.dim()))) if terms.dim() > 3 else terms


def _tol(dtype):
    # The sums accumulate in the accumulation dtype from values exact in storage: only their own
    # rounding (not storage rounding, as for dx) enters.
    return TOL[accumulation_dtype(dtype)]


def check_per_sample(per_sample, dy, x, mean, invstd, what="per_sample"):
    n, c = x.shape[0], x.shape[1]
    assert per_sample.shape == (2, n, c), f"{what}: shape {tuple(per_sample.shape)}"
    assert per_sample.dtype == accumulation_dtype(x.dtype)
    reference = per_sample_reference(dy, x, mean, invstd)
    assert_close_scaled(per_sample, reference, _abs_sums(dy, x, mean, invstd), _tol(x.dtype), what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@LAYOUTS
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@MODES
def test_per_sample_matches_reference(device, dtype, channels_last, shape, training):
    """The [2, N, C] terms against float64; summed over N they are grad_bias and grad_weight.
    The other outputs match the reference as closely as without per_sample: the kernels form
    grad_bias and grad_weight from the per-sample runs then (see the CPU kernel's file
    comment), so they, and train-mode dx through them, may round differently in the last bits
    (and the compiler may fuse the multiply-adds of a loop in one build and not the other)."""
    seed = seed_for("per_sample", device, dtype, channels_last, shape, training)
    for affine, grad_input_mask in ((True, True), (False, True), (True, False)):
        dy, x, weight, mean, invstd = make_bn_inputs(
            shape, dtype, device, channels_last=channels_last, affine=affine, seed=seed
        )
        with_samples = bn_backward_stats(dy, x, weight, mean, invstd, training, grad_input_mask, True)
        without = bn_backward_stats(dy, x, weight, mean, invstd, training, grad_input_mask)
        assert len(with_samples) == 5 and len(without) == 4
        check_against_reference(
            with_samples[:4], dy, x, weight, mean, invstd, training, grad_input_mask, dtype
        )
        for a, b in zip(with_samples[:4], without):
            assert a.shape == b.shape and a.dtype == b.dtype
        per_sample = with_samples[4]
        check_per_sample(per_sample, dy, x, mean, invstd)
        # Summed over the samples: the gradients, up to the rounding of both sides.
        grad_weight, grad_bias = with_samples[1], with_samples[2]
        totals = _abs_sums(dy, x, mean, invstd).sum(1)
        summed = per_sample.double().sum(1)
        tol = 2 * _tol(dtype)
        assert_close_scaled(summed[0], grad_bias.double(), totals[0], tol, "sum_n per_sample[0] vs grad_bias")
        assert_close_scaled(
            summed[1], grad_weight.double(), totals[1], tol, "sum_n per_sample[1] vs grad_weight"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@MODES
@pytest.mark.parametrize(
    "shape, memory_format",
    [
        ((6, 7), None),  # 2-D (N, C)
        ((300, 520), None),  # 2-D, two channel blocks, three parts
        ((4, 5, 33), None),  # 3-D (N, C, L)
        ((3, 4, 2, 5, 6), None),  # 5-D contiguous
        ((3, 4, 2, 5, 6), torch.channels_last_3d),  # 5-D channels_last_3d: channels_last kernel
        ((2, 3, 20, 30, 30), torch.channels_last_3d),  # D*H*W = 18000: samples split between parts
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("torch.", ""),
)
def test_per_sample_other_ranks(device, dtype, training, shape, memory_format):
    """2-, 3- and 5-D inputs reach the op as (N, C, L, 1) views: the result is still [2, N, C]."""
    g = torch.Generator().manual_seed(seed_for("ranks", dtype, training, shape, memory_format))
    acc = accumulation_dtype(dtype)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    dy = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    if memory_format is not None:
        x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    dims = (0, *range(2, x.dim()))
    mean = x.double().mean(dims)
    invstd = (x.double().var(dims, correction=0) + 1e-5).rsqrt()
    weight = torch.rand(shape[1], generator=g, dtype=torch.float64).add(0.5).to(acc)
    dy, x, weight, mean, invstd = (t.to(device) for t in (dy, x, weight, mean.to(acc), invstd.to(acc)))
    out = bn_backward_stats(dy, x, weight, mean, invstd, training, True, True)
    assert out[0].shape == x.shape
    check_per_sample(out[4], dy, x, mean, invstd)


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@MODES
def test_per_sample_deterministic_and_thread_count_independent(device, channels_last, training):
    """Bitwise the same run to run and (CPU) for 1 and 2 threads: no two tasks add to one
    value, and split samples merge in part order."""
    threads = torch.get_num_threads()
    for shape in ((5, 8, 45, 45), (3, 600, 7, 7), (9, 20, 31, 17), (2, 3, 100, 100)):
        dy, x, weight, mean, invstd = make_bn_inputs(
            shape, torch.float32, device, channels_last=channels_last, seed=seed_for("det", shape)
        )
        results = []
        try:
            for count in (1, 2, 2) if device == "cpu" else (threads, threads):
                torch.set_num_threads(count)
                results.append(bn_backward_stats(dy, x, weight, mean, invstd, training, True, True))
        finally:
            torch.set_num_threads(threads)
        for again in results[1:]:
            for a, b in zip(results[0], again):
                assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_per_sample_off_and_dtypes(device, dtype):
    """per_sample=False: the wrapper returns four tensors, the op a [0] fifth one; on, the fifth
    is [2, N, C] in the accumulation dtype whatever weight's dtype."""
    dy, x, weight, mean, invstd = make_bn_inputs((3, 4, 5, 5), dtype, device, seed=8)
    assert len(bn_backward_stats(dy, x, weight, mean, invstd, True, True)) == 4
    raw = torch.ops.gradstats.bn_backward_stats.default(dy, x, weight, mean, invstd, True, True)
    assert len(raw) == 5 and raw[4].shape == (0,)
    on = torch.ops.gradstats.bn_backward_stats.default(
        dy, x, weight.to(dtype), mean, invstd, True, True, True
    )
    assert on[4].shape == (2, 3, 4) and on[4].dtype == accumulation_dtype(dtype)
    assert on[1].dtype == dtype  # grad_weight follows weight; per-sample terms do not


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_under_torch_compile(device):
    """fullgraph torch.compile of the wrapper with per_sample=True: the fake kernel's shapes and
    dtypes, and the same values as eager."""
    torch._dynamo.reset()

    def fn(dy, x, weight, mean, invstd):
        return bn_backward_stats(dy, x, weight, mean, invstd, True, True, True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for channels_last in (False, True):
        args = make_bn_inputs((4, 6, 5, 3), torch.float32, device, channels_last=channels_last, seed=12)
        for a, b in zip(compiled(*args), fn(*args)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@LAYOUTS
@MODES
def test_per_sample_nonfinite_stays_in_its_sample(device, channels_last, training):
    """A NaN or an infinity in dy reaches that sample's terms only, as it reaches grad_bias: in
    a chunk (NCHW) or a row block (channels_last) shared with other samples, and in a sample
    split between parts."""
    for shape, nan_at, inf_at in (
        ((6, 3, 9, 9), (2, 1, 4, 4), (3, 0, 0, 0)),  # many samples per chunk
        ((2, 3, 100, 100), (1, 2, 0, 1), (0, 0, 99, 99)),  # rows longer than a chunk
        ((5, 8, 45, 45), (2, 5, 10, 3), (1, 7, 44, 44)),  # channels_last: split samples
    ):
        dy, x, weight, mean, invstd = make_bn_inputs(
            shape, torch.float32, device, channels_last=channels_last, seed=seed_for("nan", shape)
        )
        dy = dy.clone()
        dy[nan_at] = float("nan")
        dy[inf_at] = float("inf")
        out = bn_backward_stats(dy, x, weight, mean, invstd, training, True, True)
        per_sample = out[4].cpu()
        reference = per_sample_reference(dy, x, mean, invstd).cpu()
        assert torch.equal(torch.isnan(per_sample), torch.isnan(reference))
        assert torch.equal(torch.isinf(per_sample), torch.isinf(reference))
        assert torch.equal(per_sample[torch.isinf(per_sample)], reference[torch.isinf(reference)].float())
        bad = ~torch.isfinite(per_sample)
        assert bad.sum() == 4 and bad[:, nan_at[0], nan_at[1]].all() and bad[:, inf_at[0], inf_at[1]].all()
        finite = torch.isfinite(reference)
        scale = _abs_sums(dy, x, mean, invstd).cpu()
        assert_close_scaled(
            per_sample[finite], reference[finite], scale[finite], _tol(torch.float32), "finite"
        )
        # grad_bias carries them the same way.
        assert torch.isnan(out[2][nan_at[1]]) and torch.isinf(out[2][inf_at[1]])
