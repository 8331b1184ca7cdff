"""What the per-sample terms of the batch-norm parameter gradients tell: the formulas, as tensor
arithmetic on recorded moments (gradstats.stats: rows count, mean, M2, nonfinite), on their
device, for any number of layers at once. docs/noise.md explains them and their sources.

The per-sample terms. In train mode a BN layer's batch gradient is grad_bias[c] = sum dy and
grad_weight[c] = sum dy * x_hat over (n, h, w); sample n's terms are the same sums over its own
positions, t_n, and sum_n t_n is the batch gradient exactly. Under BN the samples interact through
the batch mean and variance (every x_hat depends on the whole batch), so t_n is sample n's share of
the gradient given the batch, not the gradient a batch of that sample alone would give.

The estimators. A record holds, per parameter j (channels x {weight, bias}), the moments of the
terms over all its samples (S_tot of them, pooled M2_s) and of the per-batch means of the terms
(K batches: mean m_b and M2_b of the K means). With S = S_tot / K samples per batch:
    s2_j        = (M2_s - S * M2_b) / (S_tot - K)   the variance of the terms within a batch
                                                  (pooled over the batches; exact for batches of
                                                  one size)
    mean_sq_j   = m_b^2 + M2_b / K                  the batches' squared mean, averaged
    tr(Sigma)   = sum_j s2_j                        unbiased estimate of the trace of the
                                                  per-sample covariance (McCandlish et al. 2018,
                                                  appendix A)
    |G|^2       = sum_j (mean_sq_j - s2_j / S)      unbiased estimate of the squared norm of the
                                                  expected term (the same appendix with B_small =
                                                  1, B_big = S: each batch's estimate, averaged)
    B_simple    = tr(Sigma) / |G|^2                 the simple noise scale
    GSNR_j      = mean_sq_j / s2_j                  gradient signal-to-noise ratio (Liu et al. 2020),
                                                  the plug-in estimate: its expectation is
                                                  G_j^2 / sigma_j^2 + 1/S
For one batch (the "last" record) these are the textbook sample mean and variance. Over several
batches, estimating per batch and averaging keeps the drift of the mean gradient between steps
(the optimizer moves the weights) out of both the noise and the signal: pooling all samples into
one mean would let gradients of opposite sign in successive steps cancel.
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
    BATCH_MEAN_BIAS,
    BATCH_MEAN_WEIGHT,
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


def _estimates(slots: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(samples per batch S, mean_sq, s2, defined) [..., 2, C] of the weight and bias terms of
    [..., 6, rows, C] slots (see the module docstring); ``defined`` where s2 exists (more
    samples than batches), the others are 0 there."""
    terms = slots[..., SAMPLE_GRAD_WEIGHT : SAMPLE_GRAD_BIAS + 1, :, :]
    means = slots[..., BATCH_MEAN_WEIGHT : BATCH_MEAN_BIAS + 1, :, :]
    total, m2 = terms[..., ROW_COUNT, :], terms[..., ROW_M2, :]
    batches, batch_mean, batch_m2 = (means[..., r, :] for r in (ROW_COUNT, ROW_MEAN, ROW_M2))
    defined = (batches > 0) & (total > batches)
    safe_batches = torch.where(defined, batches, 1.0)
    per_batch = torch.where(defined, total / safe_batches, 0.0)
    within = (m2 - per_batch * batch_m2).clamp_min(0.0)
    s2 = torch.where(defined, within / torch.where(defined, total - batches, 1.0), 0.0)
    mean_sq = torch.where(defined, batch_mean * batch_mean + batch_m2 / safe_batches, 0.0)
    return per_batch, mean_sq, s2, defined


def parameter_gsnr(slots: Tensor) -> Tensor:
    """[..., 2, C]: GSNR mean_sq / s2 of the weight and bias terms per channel; NaN where not
    defined (fewer samples than two per batch, or zero variance)."""
    _, mean_sq, s2, defined = _estimates(slots)
    defined = defined & (s2 > 0)
    return torch.where(defined, mean_sq / torch.where(defined, s2, 1.0), math.nan)


def noise_sums(slots: Tensor) -> tuple[Tensor, Tensor]:
    """(tr(Sigma), |G|^2) [...] of [..., 6, rows, C] slots: sums over channels and both
    parameters, so that layers add up to the model's."""
    per_batch, mean_sq, s2, defined = _estimates(slots)
    norm = torch.where(defined, mean_sq - s2 / torch.where(defined, per_batch, 1.0), 0.0)
    return s2.sum((-2, -1)), norm.sum((-2, -1))


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
    """[..., len(FIELDS)] float64 of [..., 6, rows, C] per-sample slots, on their device, in a
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
