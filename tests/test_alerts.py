"""gradstats.alerts: which records raise which alert, stage transitions left out, an alert reported
once when it starts, thresholds checked; and on real statistics (a model whose BN layer gets a
dead channel)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradstats
from gradstats.alerts import AlertThresholds, check, started
from gradstats.records import layer_summaries


def _bn(name, ratio, dead=0, nonfinite=0):
    return {"name": name, "stage": name.split(".")[0], "channels": 16, "dx_over_dy": ratio, "dy_dead": dead,
            "dy_nonfinite": nonfinite, "dx_nonfinite": 0}  # fmt: skip


def _block(name, ratio, nonfinite=0):
    return {"name": name, "stage": name.split(".")[0], "grad_var_ratio": ratio, "grad_nonfinite": nonfinite}


def _record(bn_layers=(), blocks=(), step=7):
    return {"step": step, "bn_layers": list(bn_layers), "blocks": list(blocks)}


def _kinds(alerts):
    return sorted((a["kind"], a["layer"]) for a in alerts)


def test_dx_over_dy_band():
    t = AlertThresholds(dx_over_dy_expected=1.5, dx_over_dy_band=10.0)
    ratios = [1.5, 14.9, 15.1, 0.149, 0.151, math.nan, None]
    record = _record([_bn(f"a.{i}", ratio) for i, ratio in enumerate(ratios)])
    alerts = check(record, t)
    assert _kinds(alerts) == [("dx_over_dy", "a.2"), ("dx_over_dy", "a.3")]
    assert all(set(a) == {"kind", "layer", "step", "message"} and a["step"] == 7 for a in alerts)
    assert "15.1" in alerts[0]["message"] and "[0.15, 15]" in alerts[0]["message"]


def test_dead_channels():
    alerts = check(_record([_bn("a.0", 1.0, dead=3), _bn("a.1", 1.0, dead=0)]))
    assert _kinds(alerts) == [("dead_channels", "a.0")]
    assert "3 of 16 channels" in alerts[0]["message"]
    assert check(_record([_bn("a.0", 1.0, dead=3)]), AlertThresholds(dead_channels=4)) == []


def test_block_growth_and_decay_within_stages_only():
    blocks = [_block("layer1.0", 12.0), _block("layer1.1", 0.05), _block("layer1.2", 0.01),  # transition
              _block("layer2.0", 9.0), _block("layer2.1", None)]  # fmt: skip
    alerts = check(_record(blocks=blocks), AlertThresholds(block_ratio=10.0))
    assert _kinds(alerts) == [("exploding", "layer1.0"), ("vanishing", "layer1.1")]


def test_nonfinite_names_the_site_when_known():
    record = _record([_bn("a.0", 1.0, nonfinite=5)], [_block("a.1", None, nonfinite=2)])
    (alert,) = check(record, nonfinite_site=("a.0", "a.0 received 5 values"))
    assert alert["kind"] == "nonfinite" and alert["layer"] == "a.0"
    assert "7 NaN/Inf" in alert["message"] and "a.0 received 5 values" in alert["message"]
    (fallback,) = check(record)
    assert fallback["layer"] == "a.1"


def test_started_reports_an_alert_once_until_it_stops():
    a = {"kind": "dead_channels", "layer": "x", "step": 1, "message": ""}
    b = {"kind": "exploding", "layer": "y", "step": 1, "message": ""}
    new, active = started([a], set())
    assert new == [a]
    new, active = started([a, b], active)
    assert new == [b]
    new, active = started([b], active)
    assert new == []
    new, active = started([a, b], active)
    assert new == [a]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dx_over_dy_band": 0.5}, "factors >= 1"),
        ({"block_ratio": math.inf}, "block_ratio must be a positive finite number"),
        ({"dx_over_dy_expected": -1.0}, "dx_over_dy_expected must be a positive"),
        ({"dead_channels": 0}, "dead_channels must be an integer >= 1"),
    ],
)
def test_thresholds_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlertThresholds(**kwargs)


def test_a_dead_channel_in_a_real_model_raises_an_alert():
    torch.manual_seed(0)
    model = gradstats.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    with torch.no_grad():
        model[1].bias[2] = -100.0  # channel 2 is negative everywhere: ReLU passes no gradient
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    bn_layers, blocks = layer_summaries(model)
    alerts = check({"step": 1, "bn_layers": bn_layers, "blocks": blocks})
    assert ("dead_channels", "1") in _kinds(alerts)
