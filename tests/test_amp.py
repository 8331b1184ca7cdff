"""Mixed precision: gradstats.track_grad_scaler puts every record in loss units and leaves the
steps a GradScaler skips out of the accumulated and moving-average statistics. CPU GradScaler,
against a twin model trained without a scaler (float32; the scale is a power of two, so scaled
and unscaled gradients agree to rounding), with a forced overflow."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cli_error
from torch import nn

import gradstats
from gradstats.tools.cli import main as cli_main
from gradstats.tools.logs import STATS_FILE, read_records


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def _assert_same_records(ours, twin, what):
    for (name, a), (_, b) in zip(gradstats.batchnorms(ours), gradstats.batchnorms(twin)):
        for slot in ("last_grad_stats", "accumulated_grad_stats", "ema_grad_stats"):
            sa, sb = getattr(a, slot), getattr(b, slot)
            for grad in ("grad_output", "grad_input"):
                ca, cb = getattr(sa, grad), getattr(sb, grad)
                assert torch.equal(ca.count, cb.count), (what, name, slot, grad)
                torch.testing.assert_close(
                    ca.mean, cb.mean, rtol=1e-5, atol=1e-9, msg=f"{what} {name} {slot}"
                )
                torch.testing.assert_close(ca.var, cb.var, rtol=1e-5, atol=0, msg=f"{what} {name} {slot}")


def test_records_are_in_loss_units_and_skipped_steps_are_left_out():
    ours = gradstats.convert_batchnorm(_model())
    twin = copy.deepcopy(ours)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    gradstats.track_grad_scaler(ours, scaler)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    scales = []
    for step in range(6):
        x = torch.randn(5, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (5,), generator=g)
        overflow = step == 3
        loss = nn.functional.cross_entropy(ours(x), y)
        if overflow:  # non-finite gradients: the scaler skips this optimizer step
            loss = loss * torch.tensor(float("inf"))
        opt_ours.zero_grad()
        scales.append(scaler.get_scale())
        scaler.scale(loss).backward()
        scaler.step(opt_ours)
        scaler.update()
        if overflow:
            last = ours[1].last_grad_stats.grad_output  # the skipped step's backward, visible
            assert (last.nonfinite > 0).all()
            assert ours[1].grad_stats_skipped_steps == 1
            continue
        opt_twin.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        opt_twin.step()
        _assert_same_records(ours, twin, f"step {step}")
    assert len(set(scales)) > 1  # the scale grew and backed off: records stayed in loss units
    assert all(m.grad_stats_skipped_steps == 1 for _, m in gradstats.batchnorms(ours))
    ours[1].reset_grad_stats()
    assert ours[1].grad_stats_skipped_steps == 0 and ours[1].accumulated_grad_stats is None


def test_without_a_tracked_scaler_records_are_in_scaled_units():
    """The problem track_grad_scaler solves (and the check that the test above can fail)."""
    ours = gradstats.convert_batchnorm(_model())
    twin = copy.deepcopy(ours)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    scaler.scale(nn.functional.cross_entropy(ours(x), y)).backward()
    nn.functional.cross_entropy(twin(x), y).backward()
    assert ours[1]._grad_stats_pending is None
    ratio = ours[1].last_grad_stats.grad_output.var / twin[1].last_grad_stats.grad_output.var
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0**24))
    with pytest.raises(AssertionError):
        _assert_same_records(ours, twin, "unscaled")


def test_a_disabled_scaler_changes_nothing():
    model = gradstats.convert_batchnorm(_model())
    gradstats.track_grad_scaler(model, torch.amp.GradScaler("cpu", enabled=False))
    assert model[1]._grad_stats_pending is None
    with pytest.raises(TypeError, match="GradScaler"):
        gradstats.track_grad_scaler(model, object())


def test_train_amp_on_cpu(tmp_path, capsys):
    """gradstats train --amp: bfloat16 autocast on CPU, records written; --amp needs a float32
    model."""
    out = tmp_path / "amp"
    argv = ["train", "--out", out, "--depth", "8", "--batch-size", "32", "--steps", "2", "--log-every", "1"]
    assert cli_main([*map(str, argv), "--amp", "--no-progress", "--no-tensorboard"]) == 0
    records = read_records(str(out / STATS_FILE))
    assert len(records) == 2
    message = cli_error([*argv[:2], tmp_path / "other", *argv[3:], "--amp", "--dtype", "float64"], capsys)
    assert "--amp" in message and "--dtype float32" in message


def test_tracked_scaler_under_torch_compile():
    """A compiled model (fullgraph) records into the pending state as well: loss units."""
    ours = gradstats.convert_batchnorm(_model())
    twin = copy.deepcopy(ours)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gradstats.track_grad_scaler(ours, scaler)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
        opt_ours.zero_grad()
        scaler.scale(nn.functional.cross_entropy(compiled(x), y)).backward()
        scaler.step(opt_ours)
        scaler.update()
        opt_twin.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        opt_twin.step()
        _assert_same_records(ours, twin, f"compiled step {step}")


def test_a_step_the_scaler_took_counts_even_when_the_scale_is_lowered_by_hand():
    # update(new_scale=...) lowers the scale after a finite step: the step was taken, so its
    # records are folded in (skips are read from the scaler's found-inf flags, not the scale).
    ours = gradstats.convert_batchnorm(_model())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gradstats.track_grad_scaler(ours, scaler)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
    scaler.scale(nn.functional.cross_entropy(ours(x), y)).backward()
    scaler.step(opt)
    scaler.update(new_scale=2.0**5)
    bn = ours[1]
    print(bn.grad_stats_skipped_steps, bn.accumulated_grad_stats)
    assert bn.grad_stats_skipped_steps == 0
    assert bn.accumulated_grad_stats is not None
    assert (bn.accumulated_grad_stats.grad_output.count == 5 * 6 * 6).all()
