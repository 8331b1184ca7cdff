"""State and autograd edge cases: statistics across threads, save/load round trips."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from torch import nn

import gradstats
from gradstats import GradStatBatchNorm2d, instrument
from gradstats.models import cifar_resnet_variant


def _train(model, seed, steps=3):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=g)
        model.zero_grad()
        model(x).square().mean().backward()


def _snapshot(model):
    return {
        name: m.grad_stats_state.clone() for name, m in gradstats.batchnorms(model) + gradstats.probes(model)
    }


def test_two_threads_on_two_models_keep_their_statistics_apart():
    torch.manual_seed(0)
    models = [instrument(cifar_resnet_variant("bn_skip", 8)) for _ in range(2)]
    expected = []
    for seed, model in enumerate(models):  # each model alone, one after the other
        twin = instrument(cifar_resnet_variant("bn_skip", 8))
        twin.load_state_dict(model.state_dict())
        _train(twin, seed)
        expected.append(_snapshot(twin))
    threads = [threading.Thread(target=_train, args=(model, seed)) for seed, model in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model, want in zip(models, expected):
        got = _snapshot(model)
        assert got.keys() == want.keys()
        for name in got:
            # Same model, same data: equal up to the float32 reduction order of the convolutions,
            # which two threads may split differently.
            assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-12), name
    differ = [
        not torch.equal(a, b) for a, b in zip(_snapshot(models[0]).values(), _snapshot(models[1]).values())
    ]
    assert all(differ)


def test_state_dict_round_trips_are_exact(tmp_path):
    torch.manual_seed(1)
    model = instrument(cifar_resnet_variant("bn_skip", 8))
    _train(model, 0)
    state = {"model": model.state_dict(), "grad_stats": gradstats.grad_stats_state_dict(model)}
    path = tmp_path / "model.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)  # plain tensors only: safe to load
    fresh = instrument(cifar_resnet_variant("bn_skip", 8))
    fresh.load_state_dict(loaded["model"])
    gradstats.load_grad_stats_state_dict(fresh, loaded["grad_stats"])
    for (name, a), (_, b) in zip(_snapshot(model).items(), _snapshot(fresh).items()):
        assert torch.equal(a, b), name
    assert torch.equal(
        fresh.layer1[0].bn1.accumulated_grad_stats.grad_output.var,
        model.layer1[0].bn1.accumulated_grad_stats.grad_output.var,
    )

    # The whole module through torch.save too (weights_only=False: a pickled module).
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    for (name, a), (_, b) in zip(_snapshot(model).items(), _snapshot(clone).items()):
        assert torch.equal(a, b), name
    _train(clone, 1, steps=1)  # and it keeps recording
    assert (
        clone.layer1[0].bn1.accumulated_grad_stats.grad_output.count.min()
        > model.layer1[0].bn1.accumulated_grad_stats.grad_output.count.min()
    )


def test_a_statistics_state_of_another_shape_is_refused():
    """No layout but the current one was ever released: a state of another shape is an error,
    not something to convert."""
    m = GradStatBatchNorm2d(4)
    m(torch.randn(3, 4, 2, 2, requires_grad=True)).sum().backward()
    state = dict(m.state_dict())
    state["grad_stats_state"] = m.grad_stats_state[:, :, :3].clone()  # as gradstats 0.1 saved it
    with pytest.raises(RuntimeError, match="size mismatch for grad_stats_state"):
        GradStatBatchNorm2d(4).load_state_dict(state)
    with pytest.raises(ValueError, match="grad_stats_state has shape"):
        gradstats.load_grad_stats_state_dict(GradStatBatchNorm2d(4), state)


def test_a_gradstats_0_1_state_dict_restores_the_statistics():
    """gradstats 0.1 saved the statistics as a buffer in state_dict: such a state_dict still
    loads (strict) and restores them, in a module and in a model."""
    torch.manual_seed(2)
    model = instrument(cifar_resnet_variant("bn_skip", 8))
    _train(model, 0)
    old = dict(model.state_dict())
    old.update(gradstats.grad_stats_state_dict(model))  # the 0.1 layout: one more key per recorder
    assert len(old) > len(model.state_dict())
    fresh = instrument(cifar_resnet_variant("bn_skip", 8))
    fresh.load_state_dict(old)  # strict
    for (name, a), (_, b) in zip(_snapshot(model).items(), _snapshot(fresh).items()):
        assert torch.equal(a, b), name
    other = instrument(cifar_resnet_variant("bn_skip", 8))
    gradstats.load_grad_stats_state_dict(other, old)  # the explicit call takes it too
    for (name, a), (_, b) in zip(_snapshot(model).items(), _snapshot(other).items()):
        assert torch.equal(a, b), name


def test_plain_batchnorm_state_dict_into_recording_model_keeps_statistics():
    m = GradStatBatchNorm2d(3)
    m(torch.randn(4, 3, 2, 2, requires_grad=True)).sum().backward()
    before = m.grad_stats_state.clone()
    m.load_state_dict(nn.BatchNorm2d(3).state_dict())
    assert torch.equal(m.grad_stats_state, before)
