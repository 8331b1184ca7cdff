"""Per-sample terms of the BN parameter gradients in the recording modules, and what gradstats
derives from them (noise scale, GSNR, dy variance split), against brute-force float64
computations on the same data."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, seed_for
from torch import nn

import gradstats
import gradstats.models
from gradstats import GradStatBatchNorm1d, GradStatBatchNorm2d, GradStatBatchNorm3d, convert_batchnorm
from gradstats.stats import PER_SAMPLE_GRADIENTS


def _bn_step(bn, x, upstream):
    """One backward through bn with dy = upstream; returns dy's per-sample terms computed by hand
    (float64): (grad_weight [N, C], grad_bias [N, C]) and x_hat."""
    out = bn(x)
    (out * upstream).sum().backward()
    dims = tuple(range(2, x.dim()))
    x64 = x.detach().double()
    if bn.training:
        mean = x64.mean((0, *dims), keepdim=True)
        var = x64.var((0, *dims), unbiased=False, keepdim=True)
    else:
        shape = (1, -1) + (1,) * len(dims)
        mean, var = bn.running_mean.double().view(shape), bn.running_var.double().view(shape)
    x_hat = (x64 - mean) / (var + bn.eps).sqrt()
    dy = upstream.double()
    if not dims:
        return dy * x_hat, dy
    return (dy * x_hat).sum(dims), dy.sum(dims)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "cls, shape",
    [
        (GradStatBatchNorm2d, (6, 5, 7, 3)),
        (GradStatBatchNorm1d, (9, 4)),
        (GradStatBatchNorm1d, (5, 3, 11)),
        (GradStatBatchNorm3d, (4, 3, 3, 4, 5)),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_last_per_sample_grads_match_hand_computation(device, cls, shape, training):
    torch.manual_seed(seed_for(cls.__name__, shape, training))
    bn = cls(shape[1], per_sample=True, dtype=torch.float64, device=device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.train(training)
    x = (torch.randn(shape, dtype=torch.float64, device=device) * 3 + 1).requires_grad_()
    upstream = torch.randn(shape, dtype=torch.float64, device=device)
    weight_terms, bias_terms = _bn_step(bn, x, upstream)
    got_weight, got_bias = bn.last_per_sample_grads
    assert got_weight.shape == got_bias.shape == (shape[0], shape[1])
    torch.testing.assert_close(got_bias, bias_terms, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_weight, weight_terms, rtol=1e-10, atol=1e-10)
    # The terms add up to the batch gradient.
    torch.testing.assert_close(got_bias.sum(0), bn.bias.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_weight.sum(0), bn.weight.grad, rtol=1e-10, atol=1e-10)
    # Statistics over samples of the last backward.
    stats = bn.last_per_sample_stats
    for got, terms in ((stats.grad_weight, weight_terms), (stats.grad_bias, bias_terms)):
        assert got.count.tolist() == [shape[0]] * shape[1]
        torch.testing.assert_close(got.mean, terms.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.var, terms.var(0, unbiased=False), rtol=1e-9, atol=1e-12)


def test_accumulated_and_ema_run_over_every_sample():
    torch.manual_seed(1)
    bn = GradStatBatchNorm2d(3, per_sample=True, dtype=torch.float64, grad_stats_ema_decay=0.5)
    all_weight, all_bias = [], []
    for step in range(3):
        x = torch.randn(4 + step, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        w, b = _bn_step(bn, x, torch.randn_like(x))
        all_weight.append(w)
        all_bias.append(b)
    acc = bn.accumulated_per_sample_stats
    weight, bias = torch.cat(all_weight), torch.cat(all_bias)
    assert acc.grad_bias.count.tolist() == [15, 15, 15]
    torch.testing.assert_close(acc.grad_weight.var, weight.var(0, unbiased=False))
    torch.testing.assert_close(acc.grad_bias.mean, bias.mean(0))
    # EMA: the last batch weighs most; with decay 0.5 its (decayed) count is 6 + 0.5*5 + 0.25*4.
    ema = bn.ema_per_sample_stats
    assert ema.grad_bias.count.tolist() == [round(6 + 2.5 + 1)] * 3
    bn.reset_grad_stats()
    assert bn.accumulated_per_sample_stats is None
    assert bn.last_per_sample_stats is not None


def test_off_by_default_and_state_shapes():
    bn = GradStatBatchNorm2d(3)
    assert not bn.grad_stats_per_sample
    assert bn.grad_stats_state.shape == (3, 2, 4, 3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    bn(x).sum().backward()
    assert bn.last_per_sample_grads is None and bn.last_per_sample_stats is None
    with pytest.raises(ValueError, match="per_sample=True"):
        gradstats.noise_scale(nn.Sequential(bn))


def test_convert_and_record_per_sample_keep_the_dy_dx_records():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    convert_batchnorm(model)
    x = torch.randn(5, 3, 6, 6)
    model(x).sum().backward()
    before = model[1].accumulated_grad_stats.grad_output.var.clone()
    convert_batchnorm(model, per_sample=True)  # already converted: switches per-sample on
    assert all(m.grad_stats_per_sample for m in (model[1], model[3]))
    torch.testing.assert_close(model[1].accumulated_grad_stats.grad_output.var, before)
    assert model[1].accumulated_per_sample_stats is None
    model(x).sum().backward()
    assert model[1].accumulated_per_sample_stats.grad_bias.count.tolist() == [5] * 4
    assert model[1].accumulated_grad_stats.grad_output.count.tolist() == [2 * 5 * 16] * 4
    model[1].record_per_sample(False)
    assert model[1].grad_stats_state.shape[1] == 2 and model[1].last_per_sample_grads is None
    # state_dict keys are nn.BatchNorm2d's either way; the statistics round-trip.
    saved = gradstats.grad_stats_state_dict(model)
    assert saved["3.grad_stats_state"].shape[1] == PER_SAMPLE_GRADIENTS


def _model(seed=0):
    torch.manual_seed(seed)
    model = gradstats.models.cifar_resnet(8, num_classes=5).double()
    return gradstats.instrument(model, per_sample=True)


def _brute_force_terms(model, steps, batch=6, seed=0):
    """Trains nothing: runs `steps` backward passes on fresh data, collecting every BN layer's
    per-sample terms and dy (through a hook on the BN output)."""
    torch.manual_seed(seed)
    bns = gradstats.batchnorms(model)
    collected = {name: {"w": [], "b": [], "dy": []} for name, _ in bns}
    handles = []
    for name, bn in bns:

        def hook(module, inputs, output, name=name):
            output.register_hook(lambda g: collected[name]["dy"].append(g.detach().clone()))

        handles.append(bn.register_forward_hook(hook))
    for _ in range(steps):
        x = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
        y = torch.randint(0, 5, (batch,))
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for name, bn in bns:
            w, b = bn.last_per_sample_grads
            collected[name]["w"].append(w)
            collected[name]["b"].append(b)
    for h in handles:
        h.remove()
    return {name: {k: torch.cat(v) for k, v in parts.items()} for name, parts in collected.items()}


def _layer_name(model, module_name):
    return next(
        n for n, m in gradstats.records.recorders(model)[0] if m is dict(model.named_modules())[module_name]
    )


def test_noise_scale_gsnr_and_split_match_brute_force():
    model = _model()
    terms = _brute_force_terms(model, steps=3)
    report = gradstats.noise_scale(model)
    g = gradstats.gsnr(model)
    split = gradstats.dy_variance_split(model)
    total_trace = total_norm = 0.0
    for module_name, parts in terms.items():
        name = _layer_name(model, module_name)
        both = torch.cat([parts["w"], parts["b"]], dim=1)  # [steps * batch, 2C]
        batches = both.reshape(3, 6, -1)  # per backward: its batch of 6 samples
        # McCandlish et al.'s estimators per batch, averaged over the batches: the noise within
        # a batch, the squared batch mean less its noise.
        var = batches.var(1, unbiased=True).mean(0)
        mean_sq = (batches.mean(1) ** 2).mean(0)
        trace = var.sum().item()
        norm = (mean_sq - var / 6).sum().item()
        total_trace += trace
        total_norm += norm
        layer = report.layers[name]
        assert layer.samples == both.shape[0] == 18
        assert layer.trace_sigma == pytest.approx(trace, rel=1e-9)
        assert layer.grad_sq_norm == pytest.approx(norm, rel=1e-6, abs=1e-12 * trace)
        expected = trace / norm if norm > 0 else math.nan
        assert layer.b_simple == pytest.approx(expected, rel=1e-6, nan_ok=True)
        # GSNR per channel: the batches' squared mean over the variance within batches.
        c = parts["w"].shape[1]
        gsnr = mean_sq / var
        torch.testing.assert_close(g[name].weight, gsnr[:c], rtol=1e-8, atol=0)
        torch.testing.assert_close(g[name].bias, gsnr[c:], rtol=1e-8, atol=0)
        # Law of total variance over (sample, position).
        dy = parts["dy"]
        per_sample_mean = dy.mean((2, 3))
        between = per_sample_mean.var(0, unbiased=False)
        within = dy.var((2, 3), unbiased=False).mean(0)
        torch.testing.assert_close(split[name].between, between, rtol=1e-8, atol=1e-30)
        torch.testing.assert_close(split[name].within, within, rtol=1e-8, atol=1e-30)
    assert report.model.trace_sigma == pytest.approx(total_trace, rel=1e-9)
    assert report.model.grad_sq_norm == pytest.approx(total_norm, rel=1e-6)
    expected = total_trace / total_norm if total_norm > 0 else math.nan
    assert report.b_simple == pytest.approx(expected, rel=1e-6, nan_ok=True)
    # Both branches of B_simple met: a positive |G|^2 estimate (a ratio) and a non-positive one.
    assert any(v.grad_sq_norm > 0 and v.b_simple > 0 for v in report.layers.values())
    # The last record alone: one batch of 6 samples.
    assert gradstats.noise_scale(model, which="last").model.samples == 6


def test_metrics_carry_per_sample_fields_and_model_noise_scale():
    model = _model()
    _brute_force_terms(model, steps=2)
    flat = gradstats.metrics(model)
    report = gradstats.noise_scale(model)
    assert flat["gradstats/model/noise_scale"] == pytest.approx(report.b_simple, rel=1e-12, nan_ok=True)
    for name, layer in report.layers.items():
        stage = gradstats.records.stage_of(name)
        key = f"gradstats/{stage}/{name}/noise_scale"
        assert flat[key] == pytest.approx(layer.b_simple, rel=1e-12, nan_ok=True)
        assert f"gradstats/{stage}/{name}/gsnr_weight" in flat
        assert 0 <= flat[f"gradstats/{stage}/{name}/dy_between_fraction"] <= 1
    # Without per-sample layers no such keys appear.
    plain = gradstats.instrument(gradstats.models.cifar_resnet(8, num_classes=5))
    plain(torch.randn(2, 3, 8, 8)).sum().backward()
    assert not any("noise_scale" in k or "gsnr" in k for k in gradstats.metrics(plain))


def test_which_is_checked():
    model = _model()
    with pytest.raises(ValueError, match="which"):
        gradstats.noise_scale(model, which="latest")


def test_compiled_model_records_per_sample_statistics():
    torch.manual_seed(3)
    bn = GradStatBatchNorm2d(4, per_sample=True)
    eager = GradStatBatchNorm2d(4, per_sample=True)
    compiled = torch.compile(bn, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    upstream = torch.randn_like(x)
    (compiled(x) * upstream).sum().backward()
    (eager(x) * upstream).sum().backward()
    got, want = bn.last_per_sample_stats, eager.last_per_sample_stats
    torch.testing.assert_close(got.grad_weight.var, want.grad_weight.var)
    torch.testing.assert_close(got.grad_bias.mean, want.grad_bias.mean)


def test_per_sample_state_follows_gradscaler_units():
    # Under a tracked GradScaler the per-sample statistics are committed in loss units, like
    # the dy/dx ones: the same as an unscaled run.
    torch.manual_seed(4)
    scaled = GradStatBatchNorm2d(3, per_sample=True)
    plain = GradStatBatchNorm2d(3, per_sample=True)
    opt = torch.optim.SGD(scaled.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gradstats.track_grad_scaler(scaled, scaler)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    upstream = torch.randn_like(x)
    scaler.scale((scaled(x) * upstream).sum()).backward()
    scaler.step(opt)
    scaler.update()
    (plain(x) * upstream).sum().backward()
    got, want = scaled.accumulated_per_sample_stats, plain.accumulated_per_sample_stats
    torch.testing.assert_close(got.grad_bias.var, want.grad_bias.var, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got.grad_weight.mean, want.grad_weight.mean, rtol=1e-5, atol=1e-9)


def test_nonfinite_samples_are_counted_and_left_out():
    bn = GradStatBatchNorm2d(2, per_sample=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(x)
    upstream[1, 0, 0, 0] = float("nan")
    _bn_step(bn, x, upstream)
    stats = bn.last_per_sample_stats
    assert stats.grad_bias.nonfinite.tolist() == [1, 0]
    assert stats.grad_bias.count.tolist() == [3, 4]
    w, b = bn.last_per_sample_grads
    assert torch.isnan(b[1, 0]) and torch.isfinite(b[[0, 2, 3], 0]).all()
    state = bn.grad_stats_state
    assert state.shape[1] == PER_SAMPLE_GRADIENTS
    assert gradstats.first_nonfinite(nn.Sequential(bn)).gradient == "grad_output"


def test_layers_without_affine_parameters_have_no_per_sample_terms():
    # The terms split grad_weight and grad_bias: a layer without them is refused when asked
    # directly, and left to dy/dx by the converters (so it adds nothing to the noise scale).
    with pytest.raises(ValueError, match="per_sample=True needs affine=True"):
        GradStatBatchNorm2d(3, affine=False, per_sample=True)
    bn = GradStatBatchNorm2d(3, affine=False)
    with pytest.raises(ValueError, match="affine=True"):
        bn.record_per_sample()
    model = nn.Sequential(nn.BatchNorm2d(3, affine=False), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    convert_batchnorm(model, per_sample=True)
    assert not model[0].grad_stats_per_sample and model[2].grad_stats_per_sample
    model(torch.randn(5, 3, 4, 4)).sum().backward()
    assert list(gradstats.noise_scale(model, which="last").layers) == ["2"]
    sync = gradstats.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3, affine=False)), per_sample=True)
    assert not sync[0].grad_stats_per_sample
