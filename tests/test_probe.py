"""GradProbe, gradstats::channel_moments, instrument() and the CIFAR ResNet variants."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, TOL, assert_close_scaled, seed_for
from torch import nn

import gradstats
from gradstats import GradProbe, channel_moments, instrument, probes
from gradstats.models import VARIANTS, cifar_resnet_variant


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided", "2d"])
def test_channel_moments_matches_float64(device, dtype, layout):
    g = torch.Generator().manual_seed(seed_for(device, dtype, layout))
    shape = (5, 300, 2, 3) if layout != "2d" else (257, 19)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1e3).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(2, 3)
    stats = channel_moments(x)
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
    count = x.numel() // x.shape[1]
    assert stats.shape == (4, x.shape[1]) and stats.dtype == torch.float64
    assert torch.equal(stats[3].cpu(), torch.zeros(x.shape[1], dtype=torch.float64))
    assert torch.equal(stats[0].cpu(), torch.full((x.shape[1],), float(count), dtype=torch.float64))
    assert_close_scaled(stats[1], mean, x.double().abs().mean(dims), TOL[dtype], "mean")
    assert_close_scaled(stats[2] / count, var, var, TOL[dtype], "var")


def test_channel_moments_opcheck_and_errors():
    torch.library.opcheck(torch.ops.gradstats.channel_moments.default, (torch.randn(3, 4, 5, 2),))
    torch.library.opcheck(torch.ops.gradstats.channel_moments.default, (torch.randn(7, 4),))
    with pytest.raises(ValueError, match="2-D to 5-D"):
        channel_moments(torch.randn(2, 3, 4, 1, 1, 1))
    with pytest.raises(TypeError, match="float32"):
        channel_moments(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one channel and one value"):
        channel_moments(torch.randn(0, 3, 2, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_probe_records_the_gradient_through_it(device):
    torch.manual_seed(0)
    probe = GradProbe(4, device=device)
    x = torch.randn(3, 4, 5, 5, device=device, requires_grad=True) * 1.0
    y = probe(x)
    assert y is x  # an identity: the same tensor, no copy
    g = torch.randn(3, 4, 5, 5, device=device) * 2 + 7
    (y * g).sum().backward()
    stats = probe.last_grad_stats
    var, mean = torch.var_mean(g.double(), dim=(0, 2, 3), correction=0)
    assert stats.grad_output is stats.grad_input
    assert torch.equal(stats.grad_output.count.cpu(), torch.full((4,), 75))
    assert torch.allclose(stats.grad_output.mean, mean, rtol=1e-6)
    assert torch.allclose(stats.grad_output.var, var, rtol=1e-5)


def test_probe_allows_inplace_ops_after_it_and_records_every_backward():
    probe = GradProbe(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    h = x * 1.0
    out = torch.relu_(probe(h))  # an in-place op on the probed tensor
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    assert (probe.accumulated_grad_stats.grad_output.count == 2 * 16).all()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_probe_on_a_leaf_reused_over_steps_records_each_backward_once(compiled):
    """A probe right on a model input that requires grad, the same tensor every step: each
    backward is recorded once (a hook on the leaf itself would pile up, one per forward)."""
    torch.manual_seed(4)
    probe = GradProbe(3)
    model = nn.Sequential(probe, nn.Conv2d(3, 2, 1))
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    grads = []
    for _ in range(3):
        x.grad = None
        out = run(x)
        assert out.data_ptr() != x.data_ptr() and probe(x).data_ptr() == x.data_ptr()  # a view, no copy
        (out * torch.randn_like(out)).sum().backward()
        grads.append(x.grad.clone())
    stats = probe.accumulated_grad_stats.grad_output
    assert (stats.count == 3 * 32).all()
    var, mean = torch.var_mean(torch.cat([g.double() for g in grads]), dim=(0, 2, 3), correction=0)
    assert torch.allclose(stats.mean, mean, rtol=1e-6, atol=1e-12)
    assert torch.allclose(stats.var, var, rtol=1e-5)


def test_probe_checks_its_input_and_keeps_activation_statistics():
    probe = GradProbe(3, record_activations=True)
    with pytest.raises(ValueError, match=r"GradProbe\(3\): expected an \(N, 3, H, W\)"):
        probe(torch.randn(2, 4, 2, 2))
    x = torch.randn(6, 3, 4, 4) * 5 + 2
    probe(x)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert torch.allclose(probe.last_activation_stats.var, var, rtol=1e-5)
    assert probe.last_grad_stats is None  # nothing required grad


@pytest.mark.parametrize("preact", [False, True], ids=["postact", "preact"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_build_and_instrument(variant, preact):
    torch.manual_seed(1)
    model = instrument(cifar_resnet_variant(variant, 8, preact=preact, width=2))
    blocks = model.blocks()
    assert len(blocks) == 3 and len(probes(model)) == 3
    bn, skip, zero_init = VARIANTS[variant]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bn
    x = torch.randn(4, 3, 16, 16)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for _, probe in probes(model):
        assert probe.last_grad_stats is not None
    if zero_init:  # branches output 0: stage-internal blocks are the identity
        for block in blocks:
            assert torch.count_nonzero(block.last_norm().weight) == 0


def test_instrument_keeps_parameter_names_and_is_idempotent():
    plain = cifar_resnet_variant("bn_skip", 8)
    names = [n for n, _ in plain.named_parameters()]
    model = instrument(copy.deepcopy(plain))
    assert [n for n, _ in model.named_parameters()] == names
    model.load_state_dict(plain.state_dict())  # strict: probes' buffers may be missing
    assert len(probes(instrument(model))) == 3


def test_instrumented_model_under_torch_compile():
    torch.manual_seed(2)
    eager = instrument(cifar_resnet_variant("bn_skip", 8))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(4, 3, 16, 16)
        eager(x).square().mean().backward()
        compiled(x).square().mean().backward()
    for (_, p1), (_, p2) in zip(probes(eager), probes(compiled_model)):
        a, b = p1.accumulated_grad_stats.grad_output, p2.accumulated_grad_stats.grad_output
        assert torch.equal(a.count, b.count)
        assert torch.allclose(a.var, b.var, rtol=1e-4)


@pytest.mark.parametrize("arch, blocks", [("resnet18", 8), ("resnet34", 16), ("resnet50", 16)])
def test_instrument_torchvision_resnets(arch, blocks):
    try:
        import torchvision.models as tv
    except Exception as error:  # absent, or a build that does not match this torch
        pytest.skip(f"torchvision is optional and not usable here: {error}")
    torch.manual_seed(3)
    model = instrument(getattr(tv, arch)(weights=None, num_classes=5))
    assert len(probes(model)) == blocks
    assert all(type(m) is not nn.BatchNorm2d for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 4])).backward()
    names = [n for n, _ in probes(model)]
    assert names[0] == "layer1.0.grad_probe" and names[-1].startswith("layer4.")
    for _, probe in probes(model):
        assert probe.last_grad_stats.grad_output.var.min() > 0
    assert gradstats.batchnorms(model)[0][1].last_grad_stats is not None


def test_merge_moments_equals_the_statistics_of_all_values():
    from gradstats.reference import channel_moments as reference_moments
    from gradstats.stats import merge_moments

    a = torch.randn(8, 5, 3, 3) * 3 + 100
    b = torch.randn(4, 5, 3, 3) * 0.5 - 2
    c = torch.randn(1, 5, 2, 2)
    merged = merge_moments([reference_moments(a), reference_moments(b), reference_moments(c)])
    values = torch.cat([t.transpose(0, 1).reshape(5, -1) for t in (a, b, c)], dim=1)  # [C, all]
    truth = reference_moments(values.unsqueeze(0).unsqueeze(3))  # as one (1, C, all, 1) tensor
    assert torch.allclose(merged, truth, rtol=1e-12, atol=1e-9)
    stacked = merge_moments(
        [torch.stack([reference_moments(a)] * 2), torch.stack([reference_moments(b)] * 2)]
    )
    assert stacked.shape == (2, 4, 5)
    with pytest.raises(ValueError, match="share one shape"):
        merge_moments([reference_moments(a), reference_moments(a)[:, :3]])


def test_grad_stats_state_dict_names_every_recording_module():
    model = instrument(cifar_resnet_variant("bn_skip", 8))
    names = list(gradstats.grad_stats_state_dict(model))
    assert "bn1.grad_stats_state" in names and "layer1.0.grad_probe.grad_stats_state" in names
    assert all(n.endswith("grad_stats_state") for n in names)
    assert len(names) == len(gradstats.batchnorms(model)) + len(probes(model))
