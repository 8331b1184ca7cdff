"""GradStatBatchNorm2d as a drop-in nn.BatchNorm2d, and the statistics it records."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES, needs_cuda
from torch import nn

from gradstats import (
    GradStatBatchNorm1d,
    GradStatBatchNorm2d,
    convert_batchnorm,
    grad_stats_state_dict,
    load_grad_stats_state_dict,
    plain_state_dict,
)


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _Block(8, 8, 1),
        _Block(8, 16, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _assert_rel(actual, expected, rtol, what):
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    print(f"{what}: max |diff| / max |expected| = {err:.2e}")
    assert err <= rtol, f"{what}: {err:.2e} > {rtol:.0e}"


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_drop_in_small_resnet(device, channels_last, train):
    """Same outputs, parameter gradients and running statistics as nn.BatchNorm2d (float32,
    1e-5 relative to each tensor's largest value) over a few steps."""
    torch.manual_seed(0)
    plain = small_resnet().to(device)
    ours = convert_batchnorm(copy.deepcopy(plain))
    assert len(_batchnorms(plain)) == 6
    assert all(type(m) is GradStatBatchNorm2d for m in _batchnorms(ours))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain.to(memory_format=fmt).train(train)
    ours.to(memory_format=fmt).train(train)
    for step in range(3):
        x = torch.randn(6, 3, 12, 12, device=device).contiguous(memory_format=fmt)
        target = torch.randint(0, 10, (6,), device=device)
        outputs = []
        for model in (plain, ours):
            model.zero_grad()
            out = model(x)
            nn.functional.cross_entropy(out, target).backward()
            outputs.append(out)
        _assert_rel(outputs[1], outputs[0], 1e-5, f"step {step} output")
        for (name, p1), (_, p2) in zip(plain.named_parameters(), ours.named_parameters()):
            _assert_rel(p2.grad, p1.grad, 1e-5, f"step {step} grad {name}")
        ours_buffers = dict(ours.named_buffers())
        for name, b1 in plain.named_buffers():
            b2 = ours_buffers[name]
            if b1.is_floating_point():
                _assert_rel(b2, b1, 1e-5, f"step {step} buffer {name}")
            else:
                assert torch.equal(b1, b2), name
    for m in _batchnorms(ours):
        assert m.last_grad_stats is not None


def test_state_dicts_load_both_ways():
    """state_dict keys are nn.BatchNorm2d's: plain and converted models load each other's
    strictly; the statistics travel through grad_stats_state_dict."""
    torch.manual_seed(0)
    plain = small_resnet()
    plain(torch.randn(4, 3, 8, 8)).sum().backward()  # running stats away from their init
    ours = convert_batchnorm(small_resnet())
    ours.load_state_dict(plain.state_dict())  # strict
    assert ours.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    ours(torch.randn(4, 3, 8, 8)).sum().backward()
    back = small_resnet()
    back.load_state_dict(ours.state_dict())  # strict
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert plain_state_dict(ours).keys() == ours.state_dict().keys()

    # The statistics go from one converted model to another through the explicit call.
    again = convert_batchnorm(small_resnet())
    load_grad_stats_state_dict(again, grad_stats_state_dict(ours))
    assert torch.equal(again[1].grad_stats_state, ours[1].grad_stats_state)
    assert again[1].last_grad_stats is not None


def _record(module, x, grad_y):
    """One forward/backward with dy = grad_y; returns (dy, dx)."""
    x = x.detach().requires_grad_()
    module(x).backward(grad_y)
    return grad_y, x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_stats_equal_var_mean(device, train):
    torch.manual_seed(1)
    m = GradStatBatchNorm2d(5, device=device).train(train)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2)
        m.running_var.uniform_(0.5, 2)
    assert m.last_grad_stats is None and m.accumulated_grad_stats is None
    x = torch.randn(4, 5, 6, 7, device=device) * 2 + 1
    dy, dx = _record(m, x, torch.randn(4, 5, 6, 7, device=device) + 3)
    stats = m.last_grad_stats
    for got, tensor in ((stats.grad_output, dy), (stats.grad_input, dx)):
        var, mean = torch.var_mean(tensor.double(), dim=(0, 2, 3), correction=0)
        assert (got.count == 4 * 6 * 7).all() and (got.nonfinite == 0).all()
        assert got.count.dtype == torch.int64
        assert got.mean.dtype == torch.float64 and got.mean.shape == (5,)
        assert torch.allclose(got.mean, mean, rtol=1e-5, atol=1e-6 * tensor.abs().mean().item())
        assert torch.allclose(got.var, var, rtol=1e-5)
    if train:  # the exact identity: dx has zero mean per channel
        assert (stats.grad_input.mean.abs() <= 1e-6 * dx.abs().mean()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_accumulated_stats_equal_concatenated_gradients(device):
    torch.manual_seed(2)
    m = GradStatBatchNorm2d(3, device=device, grad_stats_ema_decay=0.5)
    dys, dxs = [], []
    for step in range(4):
        # Different batch sizes and offsets per step: the merge must weight and shift correctly.
        n = 2 + step
        x = torch.randn(n, 3, 5, 5, device=device)
        dy, dx = _record(m, x, torch.randn(n, 3, 5, 5, device=device) * (step + 1) + 10 * step)
        dys.append(dy)
        dxs.append(dx)
    acc = m.accumulated_grad_stats
    for got, parts in ((acc.grad_output, dys), (acc.grad_input, dxs)):
        allv = torch.cat(parts).double()
        var, mean = torch.var_mean(allv, dim=(0, 2, 3), correction=0)
        assert (got.count == allv.numel() // 3).all()
        assert torch.allclose(got.mean, mean, rtol=1e-6, atol=1e-7 * allv.abs().mean().item())
        assert torch.allclose(got.var, var, rtol=1e-6)

    # The moving average: the same merge with earlier data down-weighted by 0.5 per step.
    weights = torch.tensor([0.5**3, 0.5**2, 0.5, 1.0], dtype=torch.float64, device=device)
    for got, parts in ((m.ema_grad_stats.grad_output, dys), (m.ema_grad_stats.grad_input, dxs)):
        sums = [p.double().sum((0, 2, 3)) for p in parts]
        counts = torch.tensor([p[:, 0].numel() for p in parts], dtype=torch.float64, device=device)
        total_w = (weights * counts).sum()
        mean = sum(w * s for w, s in zip(weights, sums)) / total_w
        second = sum(
            w * ((p.double() - mean.reshape(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) for w, p in zip(weights, parts)
        )
        # per-step statistics carry float32 accumulation error (~1e-7); the merge adds none
        scale = torch.cat(parts).abs().mean().item()
        assert torch.allclose(got.mean, mean, rtol=1e-6, atol=1e-7 * scale)
        assert torch.allclose(got.var, second / total_w, rtol=1e-6)

    m.reset_grad_stats()
    assert m.accumulated_grad_stats is None and m.ema_grad_stats is None
    assert m.last_grad_stats is not None


def test_snapshots_do_not_change_after_later_steps():
    m = GradStatBatchNorm2d(2)
    _record(m, torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4))
    first = m.last_grad_stats
    kept = first.grad_output.mean.clone()
    _record(m, torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4) + 5)
    assert torch.equal(first.grad_output.mean, kept)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "config",
    [
        dict(affine=False),
        dict(track_running_stats=False),
        dict(momentum=None),
        dict(eps=1e-3),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_options_match_batchnorm(device, config, train):
    torch.manual_seed(3)
    plain = nn.BatchNorm2d(4, device=device, **config).train(train)
    ours = GradStatBatchNorm2d(4, device=device, **config).train(train)
    ours.load_state_dict(plain.state_dict())
    for step in range(3):
        x = torch.randn(5, 4, 3, 3, device=device) * 3 + step
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [plain(xs[0]), ours(xs[1])]
        g = torch.randn_like(ys[0])
        for y in ys:
            y.backward(g)
        _assert_rel(ys[1], ys[0], 1e-5, "output")
        _assert_rel(xs[1].grad, xs[0].grad, 1e-5, "grad_input")
        for (name, p1), (_, p2) in zip(plain.named_parameters(), ours.named_parameters()):
            _assert_rel(p2.grad, p1.grad, 1e-5, name)
        ours_buffers = dict(ours.named_buffers())
        for name, b1 in plain.named_buffers():
            assert torch.allclose(b1.double(), ours_buffers[name].double(), rtol=1e-6), name
    assert ours.last_grad_stats is not None


def test_no_grad_and_inference_paths_record_nothing():
    m = GradStatBatchNorm2d(3)
    with torch.no_grad():
        m(torch.randn(4, 3, 2, 2))
    m.eval()
    m(torch.randn(4, 3, 2, 2))  # nothing requires grad
    assert m.last_grad_stats is None


def test_bad_input_errors_leave_statistics_untouched():
    m = GradStatBatchNorm2d(3)
    _record(m, torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5))
    before = m.grad_stats_state.clone()
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(4, 3, 5, requires_grad=True))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 3, 1, 1, requires_grad=True))
    # The exception nn.BatchNorm2d raises, with its message.
    with pytest.raises(RuntimeError) as plain_error:
        nn.BatchNorm2d(3)(torch.randn(4, 5, 2, 2, requires_grad=True))
    with pytest.raises(RuntimeError) as our_error:
        m(torch.randn(4, 5, 2, 2, requires_grad=True))
    assert str(our_error.value) == str(plain_error.value)
    with pytest.raises(NotImplementedError, match="Long"):
        m(torch.randint(0, 3, (4, 3, 2, 2)))
    assert torch.equal(m.grad_stats_state, before)
    with pytest.raises(ValueError, match="grad_stats_ema_decay"):
        GradStatBatchNorm2d(3, grad_stats_ema_decay=1.5)


def test_convert_batchnorm_shares_parameters_and_is_idempotent():
    class Custom(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Custom(4), nn.BatchNorm1d(4)).eval()
    layers = list(model)
    weight = model[1].weight
    running_mean = model[1].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = convert_batchnorm(model)
    assert converted is model
    assert list(model) == layers  # the same module objects, their classes swapped
    assert type(model[1]) is GradStatBatchNorm2d and type(model[3]) is GradStatBatchNorm1d
    assert isinstance(model[2], Custom) and type(model[2]).__name__ == "GradStatCustom"
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert not model[1].training
    assert any(p is weight for group in optimizer.param_groups for p in group["params"])
    layer = model[1]
    assert convert_batchnorm(model)[1] is layer
    assert type(convert_batchnorm(nn.BatchNorm2d(3))) is GradStatBatchNorm2d


def test_dtype_and_memory_format_moves_keep_statistics_exact():
    m = GradStatBatchNorm2d(3)
    _record(m, torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5))
    state = m.grad_stats_state.clone()
    m.half()
    assert m.weight.dtype == torch.float16
    assert m.grad_stats_state.dtype == torch.float64 and torch.equal(m.grad_stats_state, state)
    m.float().to(memory_format=torch.channels_last)
    assert m.grad_stats_state.is_contiguous() and torch.equal(m.grad_stats_state, state)
    m.double()
    _record(m, torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64))
    assert (m.accumulated_grad_stats.grad_output.count == 2 * 4 * 25).all()


@needs_cuda
def test_statistics_follow_the_module_to_cuda():
    m = GradStatBatchNorm2d(3).cuda()
    assert m.grad_stats_state.device.type == "cuda"
    _record(m, torch.randn(4, 3, 5, 5, device="cuda"), torch.randn(4, 3, 5, 5, device="cuda"))
    assert m.last_grad_stats.grad_output.mean.device.type == "cuda"


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    """Under autocast BN layers see reduced-precision inputs with float32 parameters; the module
    must accept that mix and agree with nn.BatchNorm2d under the same autocast."""
    torch.manual_seed(4)
    dtype = torch.bfloat16
    plain = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()).to(device)
    ours = convert_batchnorm(copy.deepcopy(plain))
    x = torch.randn(4, 3, 10, 10, device=device)
    grads = []
    for model in (plain, ours):
        with torch.autocast(device_type=device, dtype=dtype):
            out = model(x)
        assert out.dtype == dtype
        out.float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g1, g2 in zip(*grads):
        # bfloat16 activations: agree to a few bfloat16 ulps of the largest gradient
        _assert_rel(g2, g1, 3e-2, "autocast grad")
    stats = ours[1].last_grad_stats
    assert stats is not None and stats.grad_output.mean.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    """A compiled model runs without graph breaks (fullgraph=True), gives eager's gradients and
    still records statistics: the backward updates the statistics buffer through a custom op
    that AOTAutograd keeps in the compiled backward graph."""
    torch.manual_seed(5)
    eager = convert_batchnorm(small_resnet()).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8, device=device)
        for model in (eager, compiled):
            model.zero_grad()
            model(x).square().mean().backward()
        for (name, p1), (_, p2) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            _assert_rel(p2.grad, p1.grad, 1e-5, f"compiled grad {name}")
        for m1, m2 in zip(_batchnorms(eager), _batchnorms(compiled_model)):
            s1, s2 = m1.last_grad_stats, m2.last_grad_stats
            assert s2 is not None
            _assert_rel(s2.grad_output.var, s1.grad_output.var, 1e-5, "compiled stats")
    assert (_batchnorms(compiled_model)[0].accumulated_grad_stats.grad_output.count == 2 * 4 * 64).all()


def test_retain_graph_records_every_backward():
    m = GradStatBatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = m(x)
    y.sum().backward(retain_graph=True)
    y.square().sum().backward()
    assert (m.accumulated_grad_stats.grad_output.count == 2 * 4 * 25).all()


def test_double_backward_matches_batchnorm():
    torch.manual_seed(6)
    plain = nn.BatchNorm2d(3).double()
    ours = GradStatBatchNorm2d(3).double()
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    results = []
    for m in (plain, ours):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(xi).pow(3).sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), xi)
        results.append(gg)
    _assert_rel(results[1], results[0], 1e-10, "second derivative")


def test_gradcheck_through_the_module():
    torch.manual_seed(7)
    for train in (True, False):
        m = GradStatBatchNorm2d(3, dtype=torch.float64).train(train)
        with torch.no_grad():
            m.running_var.uniform_(0.5, 2)
        x = torch.randn(3, 3, 2, 3, dtype=torch.float64, requires_grad=True)
        momentum = m.momentum
        m.momentum = 0.0  # gradcheck calls forward many times; keep running stats fixed
        assert torch.autograd.gradcheck(m, (x,))
        m.momentum = momentum
