"""Non-finite gradients: statistics count NaN/Inf values and describe the finite ones, gradients
stay exactly PyTorch's, accumulated statistics survive a bad step, and first_nonfinite finds
where the trouble started."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, TOL, make_bn_inputs, seed_for
from torch import nn

import gradstats
from gradstats import GradStatBatchNorm2d, channel_moments, first_nonfinite
from gradstats.ops import bn_backward_stats
from gradstats.reference import channel_moments as reference_moments


def _poison(t, seed):
    """NaN at 3 places of channel 0, +Inf and -Inf in channel 1, channel 2 clean (same layout)."""
    t = t.clone()
    n, _, h, w = t.shape
    for i in torch.randperm(n * h * w, generator=torch.Generator().manual_seed(seed))[:3].tolist():
        t[i // (h * w), 0, (i % (h * w)) // w, i % w] = float("nan")
    t[0, 1, 0, 0] = float("inf")
    t[-1, 1, -1, -1] = float("-inf")
    return t


def _assert_stats_match(stats, reference, tol, what):
    count, mean, m2, nonfinite = stats.cpu().double()
    r_count, r_mean, r_m2, r_nonfinite = reference.cpu().double()
    assert torch.equal(count, r_count) and torch.equal(nonfinite, r_nonfinite), what
    have = r_count > 0
    scale = r_m2[have].clamp_min(1e-300)
    assert torch.allclose(
        mean[have], r_mean[have], rtol=tol, atol=tol * (r_m2[have] / r_count[have]).sqrt().max().item()
    )
    assert ((m2[have] - r_m2[have]).abs() <= tol * scale + 1e-300).all(), what


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nonfinite_grad_output(device, dtype, channels_last, training):
    dy, x, w, mean, invstd = make_bn_inputs(
        (6, 3, 9, 11),
        dtype,
        device,
        channels_last=channels_last,
        seed=seed_for(device, dtype, channels_last, training),
    )
    dy = _poison(dy, 0)
    grad_input, grad_weight, grad_bias, stats = bn_backward_stats(dy, x, w, mean, invstd, training, True)

    # The gradients are exactly what PyTorch's backward makes of them, NaN and Inf included.
    native = (
        torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, mean, invstd, training, 1e-5, [True, True, True]
        )
        if training
        else torch.ops.aten.native_batch_norm_backward(
            dy,
            x,
            w,
            mean,
            (1 / invstd.double() ** 2 - 1e-5).to(mean.dtype),
            None,
            None,
            False,
            1e-5,
            [True, True, True],
        )
    )
    for ours, theirs in zip((grad_input, grad_weight, grad_bias), native):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        finite = torch.isfinite(theirs)
        if finite.any():
            assert torch.allclose(
                ours[finite].double(),
                theirs[finite].double(),
                rtol=50 * TOL[dtype],
                atol=50 * TOL[dtype] * theirs[finite].double().abs().max().item(),
            )

    # Statistics: counts of finite and non-finite values, moments of the finite ones.
    _assert_stats_match(stats[0], reference_moments(dy), TOL[dtype], "dy")
    _assert_stats_match(stats[1], reference_moments(grad_input), 10 * TOL[dtype], "dx")
    m = dy.numel() // 3
    assert stats[0, 3].tolist() == [3, 2, 0]
    if training:
        # A NaN in dy reaches every dx of its channel through the reduction terms.
        assert stats[1, 3, 0].item() == m and stats[1, 0, 0].item() == 0
        assert stats[1, 3, 2].item() == 0 and stats[1, 0, 2].item() == m


def test_squares_that_overflow_float32_are_not_counted_as_nonfinite():
    """dy of 1e25: every value is finite but its square overflows float32. The chunk's sums
    overflow, its re-read in double finds no non-finite value and measures the variance."""
    dy, x, w, mean, invstd = make_bn_inputs((4, 2, 8, 8), torch.float32, "cpu", seed=5)
    dy = dy * 1e25
    _, _, _, stats = bn_backward_stats(dy, x, w, mean, invstd, False, True)
    truth = reference_moments(dy)
    assert stats[0, 3].tolist() == [0, 0]
    assert torch.allclose(stats[0, 2], truth[2], rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_channel_moments_counts_nonfinite(device):
    x = _poison(torch.randn(5, 3, 4, 4, device=device) * 3 + 1, 1)
    _assert_stats_match(channel_moments(x), reference_moments(x), 1e-5, "channel_moments")


@pytest.mark.parametrize("device", DEVICES)
def test_one_bad_step_does_not_poison_accumulated_statistics(device):
    torch.manual_seed(0)
    m = GradStatBatchNorm2d(3, device=device)
    grads = []
    for step in range(4):
        x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
        g = torch.randn(4, 3, 5, 5, device=device) + step
        if step == 2:
            g[0, 1, 0, 0] = float("inf")
            g[1, 0, 2, 2] = float("nan")
        m(x).backward(g)
        grads.append(g)
    last = m.last_grad_stats.grad_output
    assert last.nonfinite.tolist() == [0, 0, 0]  # the last step was clean
    acc = m.accumulated_grad_stats.grad_output
    assert acc.nonfinite.tolist() == [1, 1, 0]
    allg = torch.cat(grads).double()
    finite = torch.isfinite(allg)
    for c in range(3):
        values = allg[:, c][finite[:, c]]
        assert acc.count[c].item() == values.numel()
        assert math.isclose(acc.mean[c].item(), values.mean().item(), rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(acc.var[c].item(), values.var(correction=0).item(), rel_tol=1e-6)
    dx_acc = m.accumulated_grad_stats.grad_input
    assert dx_acc.nonfinite[2].item() == 0 and dx_acc.nonfinite[0].item() == 100  # 4x5x5 per step
    assert torch.isfinite(dx_acc.var).all() and torch.isfinite(m.ema_grad_stats.grad_output.var).all()


def test_channel_without_finite_values_reports_nan():
    m = GradStatBatchNorm2d(2)
    x = torch.randn(3, 2, 2, 2, requires_grad=True)
    g = torch.randn(3, 2, 2, 2)
    g[:, 0] = float("nan")
    m(x).backward(g)
    s = m.last_grad_stats.grad_output
    assert s.count.tolist() == [0, 12] and s.nonfinite.tolist() == [12, 0]
    assert math.isnan(s.mean[0].item()) and math.isnan(s.var[0].item())
    assert math.isfinite(s.var[1].item())


class _Explode(torch.autograd.Function):
    """Identity forward; the backward turns the gradient infinite (a layer that blows up)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class _Exploding(nn.Module):
    def forward(self, x):
        return _Explode.apply(x)


def test_first_nonfinite_names_the_layer():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        _Exploding(),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    gradstats.convert_batchnorm(model)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        model(x)
    assert first_nonfinite(model) is None  # no backward yet
    model(x).sum().backward()
    site = first_nonfinite(model)
    # Backward order: 8, 5, 1. Layer 5 saw finite gradients; the explosion sits between 5 and 1,
    # so layer 1 is the first to receive non-finite values.
    assert site is not None and site.name == "1" and site.gradient == "grad_output"
    assert site.channels == 4 and "received" in str(site)
    # (ReLU 2's backward zeroes the masked positions, so about half the values stay finite.)
    assert 0 < site.values < 4 * 36 * 4

    # A loss that is NaN itself: the layer nearest the loss is the first to see it.
    model.zero_grad()
    (model(x).sum() * float("nan")).backward()
    site = first_nonfinite(model)
    assert site.name == "8" and site.gradient == "grad_output"


class _Reordered(nn.Module):
    """Registers its BN layers in the opposite order to the one the forward runs them in."""

    def __init__(self):
        super().__init__()
        self.late = nn.BatchNorm2d(4)  # registered first, runs last
        self.early = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.explode = _Exploding()

    def forward(self, x):
        return self.late(self.conv2(self.explode(self.early(self.conv1(x))))).mean((1, 2, 3))


def test_first_nonfinite_follows_the_backward_not_the_registration_order():
    torch.manual_seed(2)
    model = gradstats.convert_batchnorm(_Reordered())
    x = torch.randn(4, 3, 6, 6)
    (model(x).sum() * float("nan")).backward()
    # Every layer sees NaN; the backward ran `late` first (reverse registration order would
    # name `early`).
    site = first_nonfinite(model)
    assert site.name == "late" and site.gradient == "grad_output"
    model.zero_grad()
    model(x).sum().backward()  # finite loss: the explosion between the two is found
    site = first_nonfinite(model)
    assert site.name == "early" and site.gradient == "grad_output"
    model.zero_grad()
    model(x).sum().backward()
    assert model.early._backward_seq > model.late._backward_seq > 0


def test_first_nonfinite_after_a_compiled_backward():
    """A compiled graph runs no Python hooks in its backward: the modules note no backward order
    and first_nonfinite walks the reverse registration order instead."""
    torch.manual_seed(3)
    model = gradstats.convert_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
        )
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    (compiled(torch.randn(4, 3, 6, 6)).sum() * float("nan")).backward()
    assert [m._backward_seq for m in (model[1], model[4])] == [0, 0]
    site = first_nonfinite(model)
    assert site.name == "4" and site.gradient == "grad_output"


def test_first_nonfinite_layer_that_produces_nonfinite_dx():
    """A BN layer whose running variance is 0 in eval mode has invstd = 1/sqrt(eps); with eps=0
    it is infinite: the layer turns finite dy into non-finite dx."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, eps=0.0), nn.Conv2d(3, 1, 1))
    gradstats.convert_batchnorm(model)
    with torch.no_grad():
        model[1].running_var.zero_()
    model.eval()
    model(torch.randn(2, 2, 3, 3)).sum().backward()
    site = first_nonfinite(model)
    assert site.name == "1" and site.gradient == "grad_input"
