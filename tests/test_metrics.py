"""gradstats.metrics (gradstats/records.py): the flat per-layer view for loggers. Values against
the per-channel records (ChannelStats) reduced in float64 here, NaN-aware averaging when a channel
holds no finite value, names grouped per stage (wrappers' names dropped), and one device-to-host
copy whatever the number of layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradstats
from gradstats.models import cifar_resnet
from gradstats.records import layer_summaries, metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(depth: int, steps: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = gradstats.instrument(cifar_resnet(depth))
    for _ in range(steps):
        images = torch.randn(8, 3, 16, 16)
        F.cross_entropy(model(images), torch.randint(0, 10, (8,))).backward()
    return model


def _channel_mean(values: torch.Tensor) -> float:
    return values.double().nanmean().item()


@pytest.mark.parametrize("which", ["accumulated", "last", "ema"])
def test_values_are_the_channel_averages_of_the_records(which):
    model = _trained(8)
    flat = metrics(model, which=which)
    read = f"{which}_grad_stats"
    bns = gradstats.batchnorms(model)
    assert bns
    for name, layer in bns:
        stats = getattr(layer, read)
        stage = name.split(".")[0] if "." in name else "stem"
        key = f"gradstats/{stage}/{name}/"
        for short, channels in (("dy", stats.grad_output), ("dx", stats.grad_input)):
            for field in ("mean", "var"):
                expected = _channel_mean(getattr(channels, field))
                assert flat[key + f"{short}_{field}"] == pytest.approx(expected, rel=1e-12, abs=1e-300)
            assert flat[key + f"{short}_nonfinite"] == channels.nonfinite.sum().item()
        ratio = stats.grad_input.var.mean().item() / stats.grad_output.var.mean().item()
        assert flat[key + "dx_over_dy"] == pytest.approx(ratio, rel=1e-12)
    blocks = gradstats.probes(model)
    variances = [p.__getattribute__(read).grad_output.var.mean().item() for _, p in blocks]
    for index, (name, _) in enumerate(blocks):
        block = name.removesuffix(".grad_probe")
        key = f"gradstats/{block.split('.')[0]}/{block}/"
        assert flat[key + "grad_var"] == pytest.approx(variances[index], rel=1e-12)
        if index + 1 < len(blocks):
            assert flat[key + "grad_var_ratio"] == pytest.approx(
                variances[index] / variances[index + 1], rel=1e-12
            )
        else:
            assert key + "grad_var_ratio" not in flat


def test_a_channel_without_finite_values_does_not_make_the_average_nan():
    """NaN gradients in one channel of the last BN layer: its dy average is that of the other
    channels, its non-finite count is that channel's values."""
    torch.manual_seed(1)
    model = gradstats.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    out = model(torch.randn(5, 3, 6, 6))
    weights = torch.randn_like(out)
    weights[:, 2] = math.nan  # dy of channel 2: all NaN
    (out * weights).sum().backward()
    stats = model[1].accumulated_grad_stats.grad_output
    assert stats.var.isnan().sum() == 1  # the record: channel 2 has no finite values
    flat = metrics(model)
    expected = stats.var[[0, 1, 3]].mean().item()
    assert math.isfinite(flat["gradstats/stem/1/dy_var"])
    assert flat["gradstats/stem/1/dy_var"] == pytest.approx(expected, rel=1e-12)
    assert flat["gradstats/stem/1/dy_nonfinite"] == 5 * 4 * 4


def test_dead_channels_are_counted():
    torch.manual_seed(2)
    model = gradstats.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    out = model(torch.randn(5, 3, 6, 6))
    weights = torch.randn_like(out)
    weights[:, 1] = 0.0  # channel 1 receives no gradient: zero variance
    (out * weights).sum().backward()
    bn, _ = layer_summaries(model)
    assert bn[0]["dy_dead"] == 1
    assert bn[0]["dy_var_min"] == 0.0


def test_layers_without_a_backward_are_nan_not_an_error():
    model = gradstats.instrument(cifar_resnet(8))
    flat = metrics(model)
    assert flat and all(math.isnan(v) for k, v in flat.items() if k.endswith("_var"))


def test_names_fold_per_stage_and_ignore_wrappers():
    model = _trained(8, steps=1)
    flat = metrics(model, prefix="gs.")
    stages = {key.split("/")[0] for key in flat}
    assert stages == {"gs.stem", "gs.layer1", "gs.layer2", "gs.layer3"}
    wrapped = nn.Module()
    wrapped.module = torch.compile(model)  # DDP's "module." and torch.compile's "_orig_mod."
    assert metrics(wrapped, prefix="gs.") == flat


def test_which_is_checked():
    with pytest.raises(ValueError, match="which: expected one of last, accumulated, ema, got 'all'"):
        metrics(_trained(8, steps=0), which="all")


@pytest.mark.parametrize("depth", [8, 32])
def test_one_device_to_host_copy_for_the_whole_model(monkeypatch, depth):
    """Every read of a tensor's value on the host (item, tolist, cpu, numpy, float, bool, ...):
    exactly one, of one tensor holding every layer's numbers, for 7 or 31 BN layers alike."""
    model = _trained(depth, steps=1)
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "to"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            reads.append((_name, self.numel()))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    flat = metrics(model)
    monkeypatch.undo()
    layers = len(gradstats.batchnorms(model)) * 2 + len(gradstats.probes(model))  # (layer, gradient)s
    print(f"depth {depth}: {layers} (layer, gradient) rows, host reads {reads}")
    assert [name for name, _ in reads] in (["cpu", "tolist"], ["cpu"], ["tolist"])
    assert reads[0][1] == layers * 7  # one stacked tensor: 7 numbers per (layer, gradient)
    assert len(flat) > layers
