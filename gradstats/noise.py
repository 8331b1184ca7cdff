"""Gradient noise from the per-sample terms of the batch-norm parameter gradients: the simple
noise scale B_simple, the gradient signal-to-noise ratio and the between/within split of dy's
variance, per layer and for the model, from layers recording with ``per_sample=True``
(gradstats.convert_batchnorm / instrument / GradStatBatchNorm2d). The formulas, their sources and
units are gradstats.sample_stats'; docs/noise.md shows what they mean in a training run.

Each reads a record (``which``: "accumulated" since the last reset_grad_stats(), "last"
backward, or "ema") of every such layer in one device-to-host copy or none (tensor results stay
on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .records import SLOTS, recorders
from .sample_stats import dy_variance_parts, noise_scale_of, noise_sums, parameter_gsnr
from .stats import SAMPLE_GRAD_WEIGHT

__all__ = ["NoiseScale", "ParameterGSNR", "VarianceSplit", "noise_scale", "gsnr", "dy_variance_split"]


@dataclass(frozen=True)
class NoiseScale:
    """B_simple = tr(Sigma) / |G|^2 over a set of BN parameters (a layer's weight and bias, or
    every layer's), with its two estimates in per-sample-term units (for a mean loss over batches
    of B, multiply both by B^2 for per-example gradients; B_simple does not change) and the
    number of samples they rest on. b_simple is NaN when the |G|^2 estimate is not positive
    (the noise hides the mean gradient in this record: take a longer one)."""

    b_simple: float
    trace_sigma: float
    grad_sq_norm: float
    samples: int


@dataclass(frozen=True)
class NoiseScaleReport:
    """The model's NoiseScale (all recording BN layers together) and each layer's, by name."""

    model: NoiseScale
    layers: dict[str, NoiseScale]

    @property
    def b_simple(self) -> float:
        return self.model.b_simple


@dataclass(frozen=True)
class ParameterGSNR:
    """Per channel [C] GSNR (the batches' squared mean over the variance within a batch, the
    plug-in estimate: about 1/S above the ratio of the expectations) of a layer's weight and
    bias terms; NaN where fewer than two samples per batch or zero variance."""

    weight: Tensor
    bias: Tensor


@dataclass(frozen=True)
class VarianceSplit:
    """Per channel [C]: dy's variance over (sample, position) = between + within, ``between``
    the variance of the per-sample means of dy, ``within`` the mean spatial variance inside a
    sample. NaN for channels without records."""

    between: Tensor
    within: Tensor

    @property
    def between_fraction(self) -> Tensor:
        return self.between / (self.between + self.within)


def _sampled_slots(model: nn.Module, which: str) -> list[tuple[str, Tensor]]:
    if which not in SLOTS:
        raise ValueError(f"which: expected one of {', '.join(SLOTS)}, got {which!r}")
    bns, _ = recorders(model)
    found = [
        (name, m.grad_stats_state[SLOTS[which]])
        for name, m in bns
        if m.grad_stats_state.shape[1] > SAMPLE_GRAD_WEIGHT
    ]
    if not found:
        raise ValueError(
            "no batch-norm layer of the model records per-sample terms: convert it with "
            "gradstats.convert_batchnorm(model, per_sample=True) (or instrument(..., per_sample=True))"
        )
    return found


def noise_scale(model: nn.Module, *, which: str = "accumulated") -> NoiseScaleReport:
    """B_simple of the model's BN parameters and of each layer's (see NoiseScale)."""
    found = _sampled_slots(model, which)
    sums = [
        torch.stack([*noise_sums(slot.double()), slot[SAMPLE_GRAD_WEIGHT, 0].amax()]) for _, slot in found
    ]
    values = torch.stack(sums).cpu().tolist()  # the one device-to-host copy
    layers = {
        name: NoiseScale(noise_scale_of(trace, norm), trace, norm, int(samples))
        for (name, _), (trace, norm, samples) in zip(found, values)
    }
    trace = sum(v.trace_sigma for v in layers.values())
    norm = sum(v.grad_sq_norm for v in layers.values())
    samples = max(v.samples for v in layers.values())
    return NoiseScaleReport(NoiseScale(noise_scale_of(trace, norm), trace, norm, samples), layers)


def gsnr(model: nn.Module, *, which: str = "accumulated") -> dict[str, ParameterGSNR]:
    """Per recording BN layer, the GSNR of its weight and bias per channel (on the device)."""
    result = {}
    for name, slot in _sampled_slots(model, which):
        weight, bias = parameter_gsnr(slot.double()).unbind(0)
        result[name] = ParameterGSNR(weight, bias)
    return result


def dy_variance_split(model: nn.Module, *, which: str = "accumulated") -> dict[str, VarianceSplit]:
    """Per recording BN layer, dy's variance split into between-sample and within-sample parts
    per channel (on the device)."""
    return {
        name: VarianceSplit(*dy_variance_parts(slot.double())) for name, slot in _sampled_slots(model, which)
    }
