"""gradstats.summary, the one summary of per-channel statistics, and its consumers: a channel
without finite values (every gradient value NaN or infinite) is left out of the averages in the
training logs, `gradstats analyze` and `gradstats demo` instead of turning them into NaN."""

from __future__ import annotations

import argparse
import itertools
import math

import pytest
import torch
from torch import nn

from gradstats import convert_batchnorm, instrument
from gradstats.models import cifar_resnet_variant
from gradstats.records import summarize_slots
from gradstats.stats import ROW_COUNT, ROW_NONFINITE, ChannelStats
from gradstats.summary import FIELDS, summarize_channels, summarize_moments, summary_values
from gradstats.tools import analyze, demo
from gradstats.tools.data import load_dataset
from gradstats.tools.sampling import BatchSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _random_moments(generator, channels: int, dead: list[int]) -> torch.Tensor:
    """[4, C] (count, mean, M2, nonfinite) with random values; channels in ``dead`` hold only
    non-finite values (count 0)."""
    count = torch.randint(5, 50, (channels,), generator=generator).double()
    mean = torch.randn(channels, generator=generator, dtype=torch.float64) * 3
    m2 = torch.rand(channels, generator=generator, dtype=torch.float64) * count
    nonfinite = torch.randint(0, 3, (channels,), generator=generator).double()
    moments = torch.stack([count, mean, m2, nonfinite])
    moments[ROW_COUNT, dead] = 0
    moments[ROW_NONFINITE, dead] = 7
    return moments


def _expected(moments: torch.Tensor) -> dict[str, float]:
    """The summary computed value by value in Python, over the channels with finite values."""
    count, mean, m2, nonfinite = (row.tolist() for row in moments)
    live = [c for c in range(len(count)) if count[c] > 0]
    var = [m2[c] / count[c] for c in live]
    nan = float("nan")
    return {
        "count": max(count),
        "mean": sum(mean[c] for c in live) / len(live) if live else nan,
        "var": sum(var) / len(var) if var else nan,
        "var_min": min(var) if var else nan,
        "var_max": max(var) if var else nan,
        "nonfinite": sum(nonfinite),
        "dead": sum(1 for v in var if v == 0),
    }


def _assert_matches(got: dict, expected: dict) -> None:
    for key in FIELDS:
        if math.isnan(expected[key]):
            assert math.isnan(got[key]), (key, got[key])
        else:
            assert got[key] == pytest.approx(expected[key], rel=1e-12), key


@pytest.mark.parametrize("dead", [[], [0], [2, 5], list(range(6))], ids=["none", "one", "two", "all"])
def test_summary_matches_a_python_computation(dead):
    g = torch.Generator().manual_seed(len(dead))
    moments = _random_moments(g, 6, dead)
    got = summary_values(summarize_channels(ChannelStats.from_moments(moments)))
    print(got)
    _assert_matches(got, _expected(moments))
    assert isinstance(got["count"], int) and isinstance(got["nonfinite"], int)


def test_summary_of_stacked_statistics_is_per_row():
    g = torch.Generator().manual_seed(1)
    parts = [_random_moments(g, 5, dead) for dead in ([], [1], [0, 1, 2, 3, 4])]
    stacked = ChannelStats.from_moments(torch.stack(parts, dim=1))  # fields [3, C]
    summary = summarize_channels(stacked)
    assert all(summary[key].shape == (3,) for key in FIELDS)
    for i, part in enumerate(parts):
        _assert_matches(summary_values({k: v[i] for k, v in summary.items()}), _expected(part))


def test_log_record_leaves_a_dead_channel_out():
    # The per-layer record stats.jsonl holds (gradstats train) comes from records.summarize_slots.
    g = torch.Generator().manual_seed(2)
    merged = torch.stack([_random_moments(g, 4, [1]), _random_moments(g, 4, [])])  # [2, 4, C]
    (record,), _ = summarize_slots([("bn", merged)], [])
    expected = _expected(merged[0])
    assert math.isfinite(record["dy_var"]) and record["dy_var"] == pytest.approx(expected["var"])
    assert record["dy_mean"] == pytest.approx(expected["mean"])
    assert record["dy_nonfinite"] == expected["nonfinite"]


class _PoisonChannelZero(torch.autograd.Function):
    """Identity forward; backward sets every gradient value of channel 0 to NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[:, 0] = float("nan")
        return grad


def _poison_output(module: nn.Module) -> None:
    module.register_forward_hook(lambda m, inputs, output: _PoisonChannelZero.apply(output))


def test_analyze_leaves_a_dead_channel_out():
    data = load_dataset("builtin")
    torch.manual_seed(0)
    model = instrument(cifar_resnet_variant("bn_skip", 8), record_activations=True)
    last_block = model.layer3[-1]
    _poison_output(last_block)  # after the block's probe: the probe sees channel 0 all NaN
    config = analyze.AnalysisConfig(depth=8, batch_size=32, batches=1)
    sampler = BatchSampler(len(data.train_labels), 32, 0)
    result = analyze.measure(model, data, config, sampler, itertools.count())
    block = result["blocks"][-1]
    var = last_block.grad_probe.accumulated_grad_stats.grad_output.var
    print(block)
    assert var[0].isnan() and not var[1:].isnan().any()
    assert math.isfinite(block["grad_var"])
    assert block["grad_var"] == pytest.approx(var[1:].mean().item(), rel=1e-12)
    assert block["grad_var_max"] == pytest.approx(var[1:].max().item(), rel=1e-12)


def test_demo_leaves_a_dead_channel_out(monkeypatch, capsys):
    def convert_and_poison(model):
        model = convert_batchnorm(model)
        _poison_output(model.layer3[-1].bn2)  # its dy: channel 0 all NaN
        return model

    monkeypatch.setattr(demo, "convert_batchnorm", convert_and_poison)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args(["--depth", "8", "--batch-size", "16", "--device", "cpu"])) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    row = rows["layer3.0.bn2"]
    print(row)
    mean_dy, var_dy = float(row[3]), float(row[4])
    assert math.isfinite(mean_dy) and math.isfinite(var_dy) and var_dy > 0


def test_variance_of_a_moving_average_count_below_one():
    # The moving average decays a channel's count below 1 when it sees no finite value for a
    # while: var is still M2 / count (a count of 0.25 must not be rounded up to 1).
    moments = torch.tensor([[0.25, 0.5], [1.0, -2.0], [1.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(
        ChannelStats.from_moments(moments).var, torch.tensor([4.0, 1.0], dtype=torch.float64)
    )
    summary = summary_values(dict(zip(FIELDS, summarize_moments(moments).unbind(-1))))
    assert summary["var"] == pytest.approx(2.5) and summary["var_max"] == pytest.approx(4.0)
