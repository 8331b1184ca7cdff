"""convert_batchnorm / instrument on real models (timm and torchvision) and on every batch-norm
class: every batch-norm layer records, outputs and gradients equal the unconverted model's
(float64, small inputs), timm's BatchNormAct2d keeps its activation, other normalization layers
are named in a warning (or raise with strict=True)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import gradstats
from gradstats.modules import BatchNormRecorder

MODELS = [
    ("timm", "resnet50"),
    ("timm", "efficientnet_b0"),
    ("timm", "regnety_002"),
    ("torchvision", "resnet50"),
    ("torchvision", "mobilenet_v3_small"),
    ("torchvision", "efficientnet_b0"),
]


def _build(library: str, name: str) -> nn.Module:
    if library == "timm":
        timm = pytest.importorskip("timm", reason="timm is an optional test dependency (pip install timm)")
        return timm.create_model(name, pretrained=False, num_classes=10)
    torchvision = pytest.importorskip("torchvision", reason="torchvision is an optional test dependency")
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def _block_count(model: nn.Module) -> int:
    """Residual blocks of the model, counted from the libraries' own classes."""
    names = {"BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "DepthwiseSeparableConv"}
    return sum(
        type(m).__name__ in names and type(m).__module__.startswith(("timm.models", "torchvision.models"))
        for m in model.modules()
    )


@pytest.mark.parametrize(("library", "name"), MODELS, ids=[f"{lib}-{name}" for lib, name in MODELS])
def test_real_models_record_every_batchnorm_and_keep_their_numerics(library, name):
    torch.manual_seed(0)
    plain = _build(library, name).double().train()
    ours = copy.deepcopy(plain)
    bn_names = [n for n, m in plain.named_modules() if isinstance(m, _BatchNorm)]
    assert bn_names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unconverted, nothing that does not record
        gradstats.instrument(ours)
    assert [n for n, _ in gradstats.batchnorms(ours)] == bn_names
    probes = gradstats.probes(ours)
    assert len(probes) == _block_count(plain) > 0
    assert ours.state_dict().keys() == plain.state_dict().keys()

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    outputs = []
    for model in (plain, ours):
        torch.manual_seed(1)  # the same dropout / stochastic-depth masks in both
        out = model(x)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)
    # Some gradients are zero up to rounding (a bias followed by another batch norm): compared
    # against the largest gradient of the model.
    scale = max(p.grad.abs().max().item() for p in plain.parameters())
    for (pname, p1), (_, p2) in zip(plain.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-9, atol=1e-12 * scale, msg=pname)
    for (bname, b1), (_, b2) in zip(plain.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-12, atol=1e-12, msg=bname)
    silent = [n for n, m in gradstats.batchnorms(ours) + probes if m.last_grad_stats is None]
    assert not silent


def test_timm_batchnorm_act_keeps_drop_and_activation():
    timm = pytest.importorskip("timm", reason="timm is an optional test dependency (pip install timm)")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(2)
    plain = BatchNormAct2d(4, act_layer=nn.ReLU).double()
    ours = gradstats.convert_batchnorm(copy.deepcopy(plain))
    assert isinstance(ours, BatchNormAct2d) and isinstance(ours.act, nn.ReLU)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y1, y2 = plain(x), ours(x)
    assert (y2 >= 0).all() and (y2 == 0).any()  # the activation ran
    torch.testing.assert_close(y2, y1)
    assert timm is not None


def test_every_batchnorm_class_converts_in_place():
    """BatchNorm1d ((N, C) and (N, C, L)), 2d, 3d and SyncBatchNorm (no process group: its
    per-process fallback) in one model: converted in place (same objects, parameters, hooks,
    training flag), same results, all recording."""
    torch.manual_seed(3)
    calls = []
    plain = nn.ModuleDict(
        {
            "bn1_flat": nn.BatchNorm1d(4),
            "bn1_seq": nn.BatchNorm1d(4, affine=False),
            "bn2": nn.BatchNorm2d(4, momentum=None),
            "bn3": nn.BatchNorm3d(4, track_running_stats=False),
            "sync": nn.SyncBatchNorm(4),
        }
    ).double()
    ours = copy.deepcopy(plain)
    layers = dict(ours.items())
    ours["bn2"].register_forward_hook(lambda *_: calls.append("hook"))
    ours["bn3"].eval()
    plain["bn3"].eval()
    gradstats.convert_batchnorm(ours)
    assert dict(ours.items()) == layers and not ours["bn3"].training
    assert all(isinstance(m, BatchNormRecorder) for m in ours.values())
    shapes = {
        "bn1_flat": (6, 4),
        "bn1_seq": (3, 4, 5),
        "bn2": (3, 4, 2, 3),
        "bn3": (2, 4, 2, 2, 3),
        "sync": (3, 4, 5),
    }
    for key, shape in shapes.items():
        x = torch.randn(shape, dtype=torch.float64)
        results = []
        for model in (plain, ours):
            xi = x.clone().requires_grad_()
            y = model[key](xi)
            y.backward(torch.linspace(-1, 2, y.numel(), dtype=torch.float64).reshape(y.shape))
            results.append([y, xi.grad])
        torch.testing.assert_close(results[1], results[0], msg=key)
        dy = torch.linspace(-1, 2, x.numel(), dtype=torch.float64).reshape(shape).movedim(1, 0).reshape(4, -1)
        torch.testing.assert_close(
            ours[key].last_grad_stats.grad_output.var, dy.var(1, correction=0), msg=key
        )
    assert calls == ["hook"]


def test_channels_last_3d_reaches_the_kernel_without_a_copy():
    from gradstats import ops

    x = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    assert ops.as_4d(x).data_ptr() == x.data_ptr()
    assert ops.as_4d(torch.randn(2, 3, 7)).is_contiguous()
    m = gradstats.GradStatBatchNorm3d(3)
    xi = x.clone().requires_grad_()
    m(xi).sum().backward()
    reference = nn.BatchNorm3d(3)
    xr = x.clone().requires_grad_()
    reference(xr).sum().backward()
    torch.testing.assert_close(xi.grad, xr.grad)
    assert xi.grad.is_contiguous(memory_format=torch.channels_last_3d)


class _HandRolled(nn.BatchNorm2d):
    """A subclass computing batch norm itself (no F.batch_norm): converted, but records nothing."""

    def forward(self, x):
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), keepdim=True, correction=0)
        return (x - mean) / (var + self.eps).sqrt()


def test_layers_that_do_not_record_are_named():
    timm = pytest.importorskip("timm", reason="timm is an optional test dependency (pip install timm)")
    from timm.layers import FrozenBatchNormAct2d
    from torchvision.ops import FrozenBatchNorm2d  # the one timm's models use

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        FrozenBatchNorm2d(4),
        nn.LayerNorm([4, 2, 2]),
        FrozenBatchNormAct2d(4),
    )
    with pytest.warns(
        UserWarning,
        match=r"4 normalization layer\(s\).*2 \(GroupNorm\).*3 \(FrozenBatchNorm2d\).*4 \(LayerNorm\)"
        r".*5 \(FrozenBatchNormAct2d\)",
    ):
        gradstats.convert_batchnorm(copy.deepcopy(model))
    with pytest.raises(ValueError, match="FrozenBatchNorm2d"):
        gradstats.convert_batchnorm(copy.deepcopy(model), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradstats.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), strict=True)

    hand = gradstats.convert_batchnorm(_HandRolled(4))
    with pytest.warns(UserWarning, match="_HandRolled.forward made no F.batch_norm call"):
        hand(torch.randn(3, 4, 2, 2, requires_grad=True)).sum().backward()
    assert hand.last_grad_stats is None
    assert timm is not None


def test_timm_sync_batchnorm_act_records_in_one_process():
    """timm's SyncBatchNormAct (an nn.SyncBatchNorm whose forward adds drop and activation):
    without a process group it runs F.batch_norm, which records. (Under a multi-rank group it
    runs torch's synchronised function, which gradstats does not intercept: it warns.)"""
    pytest.importorskip("timm", reason="timm is an optional test dependency (pip install timm)")
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import convert_sync_batchnorm

    torch.manual_seed(4)
    plain = convert_sync_batchnorm(BatchNormAct2d(4, act_layer=nn.ReLU)).double()
    assert type(plain).__name__ == "SyncBatchNormAct"
    ours = gradstats.convert_batchnorm(copy.deepcopy(plain))
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [plain(xs[0]), ours(xs[1])]
    for y in ys:
        y.sum().backward()
    torch.testing.assert_close(ys[1], ys[0])
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    assert (ys[1] >= 0).all() and ours.last_grad_stats is not None
