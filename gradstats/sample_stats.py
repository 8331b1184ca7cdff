"""What the per-sample terms of the batch-norm parameter gradients tell: the formulas, as tensor
arithmetic on recorded moments (gradstats.stats: rows count, mean, M2, nonfinite), on their
device, for any number of layers at once. docs/noise.md explains them and their sources.

The per-sample terms. In train mode a BN layer's batch gradient is grad_bias[c] = sum dy and
grad_weight[c] = sum dy * x_hat over (n, h, w); sample n's terms are the same sums over its own
positions, t_n, and sum_n t_n is the batch gradient exactly. Under BN the samples interact through
the batch mean and variance (every x_hat depends on the whole batch), so t_n is sample n's share of
the gradient given the batch, not the gradient a batch of that sample alone would give.

The estimators, per record of S samples with per-parameter mean m_j and unbiased variance
s2_j = M2_j / (S - 1) of the terms (j runs over channels x {weight, bias}):
    tr(Sigma)   = sum_j s2_j                      unbiased estimate of the trace of the per-sample
                                                  covariance (McCandlish et al. 2018, appendix A)
    |G|^2       = sum_j (m_j^2 - s2_j / S)        unbiased estimate of the squared norm of the
                                                  expected term (the same appendix, B_small = 1)
    B_simple    = tr(Sigma) / |G|^2               the simple noise scale
    GSNR_j      = m_j^2 / s2_j                    gradient signal-to-noise ratio (Liu et al. 2020)
Units: for a loss that is the mean over the batch of B samples, sample n's own gradient is
g_n = B t_n, so tr(Sigma) and |G|^2 of the g_n are B^2 times those reported here; for a sum loss
g_n = t_n. B_simple and GSNR are ratios, the same either way.

The dy variance split (law of total variance over the (sample, position) pairs, every sample
having the same P positions): Var(dy) = Var_n(mean_p dy[n]) + mean_n Var_p(dy[n]); the first
(between samples) is the population variance of the grad_bias terms divided by P^2, the second
(within a sample, spatial) the rest.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stats import (
    GRAD_OUTPUT,
    ROW_COUNT,
    ROW_M2,
    ROW_MEAN,
    ROW_NONFINITE,
    SAMPLE_GRAD_BIAS,
    SAMPLE_GRAD_WEIGHT,
)

# Per layer, in this order (the last dimension of layer_fields):
#   samples        samples in the record (the largest count over channels)
#   trace_sigma    tr(Sigma) of the layer's parameters (weight and bias, every channel)
#   grad_sq_norm   |G|^2 of the same
#   noise_scale    B_simple = trace_sigma / grad_sq_norm (NaN when grad_sq_norm <= 0: the noise
#                  hides the mean in this record)
#   gsnr_weight, gsnr_bias   GSNR averaged over the channels where it is defined
#   dy_between, dy_within    channel averages of the two parts of dy's variance
#   dy_between_fraction      channel average of between / (between + within)
FIELDS = (
    "samples",
    "trace_sigma",
    "grad_sq_norm",
    "noise_scale",
    "gsnr_weight",
    "gsnr_bias",
    "dy_between",
    "dy_within",
    "dy_between_fraction",
)


def _terms(slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, unbiased variance) [..., 2, C] of the weight and bias terms of [..., 4, rows,
    C] slots; channels with fewer than two samples have count 0 and variance 0."""
    terms = slots[..., SAMPLE_GRAD_WEIGHT : SAMPLE_GRAD_BIAS + 1, :, :]
    count, mean, m2 = (terms[..., r, :] for r in (ROW_COUNT, ROW_MEAN, ROW_M2))
    enough = count > 1
    count = torch.where(enough, count, 0.0)
    var = torch.where(enough, m2 / torch.where(enough, count - 1, 1.0), 0.0)
    return count, torch.where(enough, mean, 0.0), var


def parameter_gsnr(slots: Tensor) -> Tensor:
    """[..., 2, C]: GSNR m^2 / s2 of the weight and bias terms per channel; NaN where fewer
    than two samples or zero variance."""
    count, mean, var = _terms(slots)
    defined = (count > 1) & (var > 0)
    return torch.where(defined, mean * mean / torch.where(defined, var, 1.0), math.nan)


def noise_sums(slots: Tensor) -> tuple[Tensor, Tensor]:
    """(tr(Sigma), |G|^2) [...] of [..., 4, rows, C] slots: sums over channels and both
    parameters, so that layers add up to the model's."""
    count, mean, var = _terms(slots)
    trace = var.sum((-2, -1))
    norm = torch.where(count > 1, mean * mean - var / torch.where(count > 1, count, 1.0), 0.0).sum((-2, -1))
    return trace, norm


def dy_variance_parts(slots: Tensor) -> tuple[Tensor, Tensor]:
    """(between, within) [..., C]: dy's population variance split into the part between samples
    and the part within them (spatial); NaN for channels without records."""
    dy = slots[..., GRAD_OUTPUT, :, :]
    bias = slots[..., SAMPLE_GRAD_BIAS, :, :]
    dy_count, dy_m2 = dy[..., ROW_COUNT, :], dy[..., ROW_M2, :]
    samples = bias[..., ROW_COUNT, :]
    have = (dy_count > 0) & (samples > 0)
    # Positions per sample: every value, finite or not, belongs to one sample.
    positions = (dy_count + dy[..., ROW_NONFINITE, :]) / torch.where(
        have, samples + bias[..., ROW_NONFINITE, :], 1.0
    )
    total = torch.where(have, dy_m2 / torch.where(have, dy_count, 1.0), math.nan)
    between = torch.where(
        have, bias[..., ROW_M2, :] / torch.where(have, samples * positions * positions, 1.0), math.nan
    )
    # Rounding can leave the difference a hair below zero when dy is constant within samples.
    within = (total - between).clamp_min(0.0)
    return between, within


def layer_fields(slots: Tensor) -> Tensor:
    """[..., len(FIELDS)] float64 of [..., 4, rows, C] per-sample slots, on their device, in a
    fixed number of operations."""
    slots = slots.double()
    trace, norm = noise_sums(slots)
    gsnr = parameter_gsnr(slots)
    between, within = dy_variance_parts(slots)
    total = between + within
    fraction = torch.where(total > 0, between / torch.where(total > 0, total, 1.0), math.nan)
    samples = slots[..., SAMPLE_GRAD_WEIGHT, ROW_COUNT, :].amax(-1)
    return torch.stack(
        [
            samples,
            trace,
            norm,
            torch.where(norm > 0, trace / torch.where(norm > 0, norm, 1.0), math.nan),
            gsnr[..., 0, :].nanmean(-1),
            gsnr[..., 1, :].nanmean(-1),
            between.nanmean(-1),
            within.nanmean(-1),
            fraction.nanmean(-1),
        ],
        dim=-1,
    )


def noise_scale_of(trace: float, norm: float) -> float:
    """B_simple from summed tr(Sigma) and |G|^2 (several layers: the sums of theirs)."""
    return trace / norm if norm > 0 else math.nan
