"""gradstats::bn_backward_stats against the float64 reference, gradcheck, opcheck and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICES,
    FLOAT_DTYPES,
    TOL,
    assert_close_scaled,
    make_bn_inputs,
    needs_cuda,
    seed_for,
    subnormal_spacing,
)

from gradstats.ops import bn_backward_stats
from gradstats.reference import bn_backward_stats_reference

SHAPES = [
    (2, 5, 1, 1),  # N*H*W = 2: the smallest batch training allows
    (1, 3, 1, 2),  # N*H*W = 2 with N = 1
    (4, 3, 5, 7),  # odd everything
    (3, 17, 9, 9),  # C not a multiple of any vector or block width
    (2, 1000, 2, 2),  # C = 1000 (channels_last: two channel blocks)
    (5, 48, 4, 4),  # channels_last: three vectors per row
    (3, 300, 2, 3),  # channels_last: strips of 4 and of 1 vector and a scalar tail
    (4, 40, 36, 36),  # channels_last: 5184 rows, several parts of two chunks
    (2, 16, 33, 33),  # H*W not a multiple of the vector width
    (1, 2, 130, 130),  # > 8192 values per channel: several chunks per task
    (7, 1, 3, 3),  # a single channel
]


def _per_channel(t):
    return t.reshape(1, -1, 1, 1)


def check_against_reference(out, dy, x, weight, mean, invstd, training, grad_input_mask, dtype):
    grad_input, grad_weight, grad_bias, stats = out
    ref_gi, ref_gw, ref_gb, ref_stats = bn_backward_stats_reference(dy, x, weight, mean, invstd, training)
    tol = TOL[dtype]
    dy64, x64 = dy.double(), x.double()
    m = dy.numel() // dy.shape[1]
    scale = invstd.double() * (weight.double() if weight is not None else 1.0)
    x_hat = (x64 - _per_channel(mean.double())) * _per_channel(invstd.double())
    dims = (0, 2, 3)

    # Rounding is proportional to the magnitude of the terms of each result, not to the result
    # (which may cancel to ~0, as dx does when N*H*W = 2).
    terms_dx = _per_channel(scale.abs()) * (
        dy64.abs()
        + _per_channel(dy64.abs().mean(dims))
        + x_hat.abs() * _per_channel((dy64 * x_hat).abs().mean(dims))
    )
    if grad_input_mask:
        assert grad_input.shape == x.shape and grad_input.dtype == x.dtype
        assert_close_scaled(grad_input, ref_gi, terms_dx, tol, "grad_input", atol=subnormal_spacing(dtype))
    else:
        assert grad_input.numel() == 0
    assert_close_scaled(grad_bias, ref_gb, dy64.abs().sum(dims), tol, "grad_bias")
    assert_close_scaled(grad_weight, ref_gw, (dy64 * x_hat).abs().sum(dims), tol, "grad_weight")

    assert stats.dtype == torch.float64 and stats.shape == (2, 4, dy.shape[1])
    assert torch.equal(stats[:, 0].cpu(), torch.full_like(stats[:, 0].cpu(), m))  # all finite
    assert torch.equal(stats[:, 3].cpu(), torch.zeros_like(stats[:, 3].cpu()))
    # dy: exact storage values, so only accumulation rounding: the mean relative to mean|dy|, the
    # variance relative to itself (which large offsets would break).
    # dx: each value carries an error of up to tol * T (T = terms_dx), which moves the mean by
    # tol * T and the variance by up to 2 * std * tol * T + (tol * T)^2.
    for which, name, terms in ((0, "dy", dy64.abs()), (1, "dx", terms_dx)):
        ref_mean = ref_stats[which, 1]
        ref_var = ref_stats[which, 2] / m
        T = terms.mean(dims) if which == 1 else torch.zeros_like(ref_var)
        # dx values that land in the storage type's subnormal range round by an absolute step.
        sub = subnormal_spacing(dtype) if which == 1 else 0.0
        assert_close_scaled(stats[which, 1], ref_mean, terms.mean(dims), tol, f"mean({name})", atol=sub)
        var_scale = ref_var + 2 * ref_var.sqrt() * T + tol * T**2
        # The float64 reference rounds its own mean: a variance of exactly 0 comes out as
        # ~(ulp of the mean)^2, which no relative tolerance covers.
        reference_rounding = 16 * (torch.finfo(torch.float64).eps * terms.mean(dims)) ** 2
        assert_close_scaled(
            stats[which, 2] / m,
            ref_var,
            var_scale,
            tol,
            f"var({name})",
            atol=reference_rounding + 2 * ref_var.sqrt() * sub + sub**2,
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(device, dtype, channels_last, shape, training):
    seed = seed_for(device, dtype, channels_last, shape, training)
    for affine, grad_input_mask in ((True, True), (False, True), (True, False)):
        dy, x, weight, mean, invstd = make_bn_inputs(
            shape, dtype, device, channels_last=channels_last, affine=affine, seed=seed
        )
        out = bn_backward_stats(dy, x, weight, mean, invstd, training, grad_input_mask)
        if grad_input_mask:
            assert out[0].is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
                memory_format=torch.channels_last
            ), "grad_input must keep input's layout"
        check_against_reference(out, dy, x, weight, mean, invstd, training, grad_input_mask, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 64, 97, 95), (4, 200, 77, 77)], ids=lambda s: "x".join(map(str, s)))
def test_large_grad_input_streamed_past_the_caches_cpu(channels_last, shape):
    """grad_input of 16 MB or more is written with streaming stores on CPU (aligned vectors only:
    an odd H*W makes NCHW channels start unaligned; 200 channels make channels_last rows that
    are not whole vectors apart)."""
    assert torch.Size(shape).numel() * 4 >= 16 << 20
    for training in (True, False):
        dy, x, weight, mean, invstd = make_bn_inputs(
            shape,
            torch.float32,
            "cpu",
            channels_last=channels_last,
            seed=seed_for("cpu", channels_last, shape, training),
        )
        out = bn_backward_stats(dy, x, weight, mean, invstd, training, True)
        check_against_reference(out, dy, x, weight, mean, invstd, training, True, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arbitrary_strides_match_reference(device, dtype):
    """Inputs that are neither NCHW- nor channels_last-contiguous (slices, permutes, mixed
    layouts of dy and x) go through one contiguous copy and give the same results."""
    dy, x, weight, mean, invstd = make_bn_inputs((6, 5, 8, 10), dtype, device, seed=7)
    sliced_x = x[:, :, :, ::2]
    sliced_dy = dy[:, :, :, ::2]
    x64 = sliced_x.double()
    mean = x64.mean((0, 2, 3)).to(mean.dtype)
    invstd = (x64.var((0, 2, 3), correction=0) + 1e-5).rsqrt().to(invstd.dtype)
    cases = [
        (sliced_dy, sliced_x),
        (sliced_dy.contiguous(memory_format=torch.channels_last), sliced_x.contiguous()),
        (sliced_dy.contiguous(), sliced_x.contiguous(memory_format=torch.channels_last)),
        (sliced_dy.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), sliced_x),
    ]
    for dy_case, x_case in cases:
        for training in (True, False):
            out = bn_backward_stats(dy_case, x_case, weight, mean, invstd, training, True)
            check_against_reference(out, dy_case, x_case, weight, mean, invstd, training, True, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_large_offset_variance(device, channels_last, training):
    """dy with |mean| / std = 1e4 per channel: float32 variance within 1e-4 relative of the
    float64 truth. The textbook sum(v^2) - sum(v)^2/n in float32 fails here (checked below, so
    this test cannot pass by accident on easy data)."""
    shape = (16, 8, 24, 24)
    dy, x, weight, mean, invstd = make_bn_inputs(
        shape, torch.float32, device, channels_last=channels_last, seed=11, dy_offset=0.0
    )
    offsets = torch.linspace(-1e4, 1e4, shape[1], device=device).reshape(1, -1, 1, 1)
    dy = (dy + offsets).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    _, _, _, stats = bn_backward_stats(dy, x, weight, mean, invstd, training, True)
    dy64 = dy.double()
    true_var = dy64.var((0, 2, 3), correction=0)
    rel = ((stats[0, 2] / stats[0, 0]) - true_var).abs() / true_var
    print(f"offset 1e4: max relative variance error {rel.max().item():.2e}")
    assert rel.max().item() < 1e-4

    flat = dy.transpose(0, 1).reshape(shape[1], -1)
    naive = (flat * flat).sum(1) / flat.shape[1] - (flat.sum(1) / flat.shape[1]) ** 2
    naive_rel = ((naive.double() - true_var).abs() / true_var).max().item()
    print(f"naive float32 formula: max relative variance error {naive_rel:.2e}")
    assert naive_rel > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_train_identities(device, channels_last):
    """Train mode: per channel, mean(dx) = 0 and sum(x_hat * dx) = 0 up to rounding."""
    dy, x, weight, mean, invstd = make_bn_inputs(
        (8, 12, 10, 10), torch.float32, device, channels_last=channels_last, seed=3, dy_offset=2.0
    )
    grad_input, _, _, stats = bn_backward_stats(dy, x, weight, mean, invstd, True, True)
    dx = grad_input.double()
    x_hat = (x.double() - _per_channel(mean.double())) * _per_channel(invstd.double())
    scale = dx.abs().mean((0, 2, 3))
    print("mean(dx)/mean|dx|:", (stats[1, 1].abs() / scale).max().item())
    assert (stats[1, 1].abs() <= 1e-5 * scale).all()
    assert ((x_hat * dx).sum((0, 2, 3)).abs() <= 1e-5 * (x_hat * dx).abs().sum((0, 2, 3))).all()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    dy, x, weight, mean, invstd = make_bn_inputs((9, 20, 31, 17), torch.float32, device, seed=5)
    for channels_last in (False, True):
        if channels_last:
            dy, x = (t.contiguous(memory_format=torch.channels_last) for t in (dy, x))
        first = bn_backward_stats(dy, x, weight, mean, invstd, True, True)
        for _ in range(3):
            again = bn_backward_stats(dy, x, weight, mean, invstd, True, True)
            for a, b in zip(first, again):
                assert torch.equal(a, b)


def test_cpu_results_do_not_depend_on_thread_count():
    """Tasks are cut by shape, not by thread count, so results are bitwise identical."""
    dy, x, weight, mean, invstd = make_bn_inputs((16, 6, 40, 40), torch.float32, "cpu", seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bn_backward_stats(dy, x, weight, mean, invstd, True, True)
        torch.set_num_threads(max(2, threads))
        many = bn_backward_stats(dy, x, weight, mean, invstd, True, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# -- autograd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_of_op(device, channels_last):
    """The op's own derivative (its autograd formula: the second derivative of batch norm)."""
    dy, x, weight, mean, invstd = make_bn_inputs(
        (3, 4, 3, 2), torch.float64, device, channels_last=channels_last, seed=1
    )
    inputs = [t.detach().requires_grad_() for t in (dy, x, weight, mean, invstd)]
    for training in (True, False):
        fn = lambda *a, training=training: bn_backward_stats(*a, training, True)[:3]  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for shape, channels_last, dtype in (
        ((3, 4, 5, 2), False, torch.float32),
        ((2, 6, 3, 3), True, torch.float64),
        ((4, 3, 1, 1), False, torch.float16),
    ):
        dy, x, weight, mean, invstd = make_bn_inputs(
            shape, dtype, device, channels_last=channels_last, seed=2
        )
        for args in (
            (dy, x, weight, mean, invstd, True, True),
            (dy, x, None, mean, invstd, False, True),
            (dy, x, weight, mean, invstd, True, False),
        ):
            for per_sample in ((), (True,)):  # the schema's default, and the per-sample output
                torch.library.opcheck(torch.ops.gradstats.bn_backward_stats.default, args + per_sample)
    state = torch.zeros(3, 2, 4, 4, dtype=torch.float64, device=device)
    stats = torch.rand(2, 4, 4, dtype=torch.float64, device=device) + 1
    torch.library.opcheck(torch.ops.gradstats.record_grad_stats_.default, (state, stats, 0.9))


# -- bad input ----------------------------------------------------------------------------------


def _valid(device="cpu"):
    return make_bn_inputs((4, 3, 5, 5), torch.float32, device, seed=4)


BAD_CASES = {
    "input_not_2d_to_5d": (
        lambda dy, x, w, m, i: (dy[0, 0, 0], x[0, 0, 0], w, m, i, True, True),
        ValueError,
        "input must be a 2-D to 5-D",
    ),
    "grad_output_shape": (
        lambda dy, x, w, m, i: (dy[:2], x, w, m, i, True, True),
        ValueError,
        "grad_output must have input's shape",
    ),
    "weight_channels": (
        lambda dy, x, w, m, i: (dy, x, w[:2], m, i, True, True),
        ValueError,
        "weight must have shape [3]",
    ),
    "mean_channels": (
        lambda dy, x, w, m, i: (dy, x, w, m[:2], i, True, True),
        ValueError,
        "mean must have shape [3]",
    ),
    "invstd_2d": (
        lambda dy, x, w, m, i: (dy, x, w, m, i[None], True, True),
        ValueError,
        "invstd must have shape [3]",
    ),
    "dtype_mismatch": (
        lambda dy, x, w, m, i: (dy.double(), x, w, m, i, True, True),
        TypeError,
        "grad_output must have input's dtype",
    ),
    "weight_dtype": (
        lambda dy, x, w, m, i: (dy, x, w.double(), m, i, True, True),
        TypeError,
        "weight must be",
    ),
    "integer_input": (
        lambda dy, x, w, m, i: (dy.long(), x.long(), w, m, i, True, True),
        TypeError,
        "input must be float32",
    ),
    "empty_batch": (
        lambda dy, x, w, m, i: (dy[:0], x[:0], w, m, i, True, True),
        ValueError,
        "no values per channel",
    ),
    "one_value_training": (
        lambda dy, x, w, m, i: (dy[:1, :, :1, :1], x[:1, :, :1, :1], w, m, i, True, True),
        ValueError,
        "more than 1 value per channel",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_the_argument(case):
    make_args, error, message = BAD_CASES[case]
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        bn_backward_stats(*make_args(*_valid()))


def test_one_value_per_channel_is_fine_in_eval():
    dy, x, w, m, i = _valid()
    out = bn_backward_stats(dy[:1, :, :1, :1], x[:1, :, :1, :1], w, m, i, False, True)
    assert out[0].shape == (1, 3, 1, 1)


@needs_cuda
def test_device_mismatch_names_the_argument():
    dy, x, w, m, i = _valid()
    with pytest.raises(ValueError, match="mean must be on input's device"):
        bn_backward_stats(dy.cuda(), x.cuda(), w.cuda(), m, i.cuda(), True, True)
    with pytest.raises(ValueError, match="grad_output must be on input's device"):
        bn_backward_stats(dy, x.cuda(), w.cuda(), m.cuda(), i.cuda(), True, True)
