"""Summaries of per-channel statistics into a few numbers per gradient: the one definition that
``gradstats.metrics``, the training logs, `gradstats analyze`, `gradstats demo`, the Lightning
callback and the health alerts report.

A channel can hold no finite value in an interval (every gradient value NaN or infinite), or no
value at all (a padding channel, a layer that saw no backward): count 0, its mean and variance
undefined. Averages over channels leave such channels out (nanmean), so that one poisoned channel
does not hide the others; ``nonfinite`` says how many values were left out. A summary is NaN only
when no channel had a finite value.

The work is tensor arithmetic on the statistics' device over the last (channel) dimension, so it
takes stacked [..., rows, C] moments of many modules at once and reads nothing back: callers
bring the result to the host in one transfer (``summary_values`` for one gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stats import ROW_COUNT, ROW_M2, ROW_MEAN, ROW_NONFINITE, ChannelStats

# What a summary holds per gradient, in this order (the last dimension of summarize_moments):
#   count       values per channel (the largest over channels)
#   mean, var   per-channel mean and population variance averaged over the channels that have
#               finite values (NaN if none has)
#   var_min, var_max  the smallest and largest of those per-channel variances (NaN if none)
#   nonfinite   NaN and infinite values, summed over channels (left out of the moments)
#   dead        channels with finite values whose variance is exactly zero
FIELDS = ("count", "mean", "var", "var_min", "var_max", "nonfinite", "dead")
_INTEGER_FIELDS = ("count", "nonfinite", "dead")


def summarize_moments(moments: Tensor) -> Tensor:
    """[..., len(FIELDS)] float64: the FIELDS of [..., rows, C] moments (rows count, mean, M2,
    nonfinite; see gradstats.stats), on their device, in a fixed number of operations."""
    moments = moments.double()
    count, mean, m2, nonfinite = (moments[..., r, :] for r in (ROW_COUNT, ROW_MEAN, ROW_M2, ROW_NONFINITE))
    have = count > 0
    nan = torch.full_like(mean, math.nan)
    var = torch.where(have, m2 / torch.where(have, count, 1.0), nan)
    any_channel = have.any(-1)
    return torch.stack(
        [
            count.amax(-1),
            torch.where(have, mean, nan).nanmean(-1),
            var.nanmean(-1),
            torch.where(any_channel, torch.where(have, var, math.inf).amin(-1), math.nan),
            torch.where(any_channel, torch.where(have, var, -math.inf).amax(-1), math.nan),
            nonfinite.sum(-1),
            (have & (var == 0)).sum(-1, dtype=torch.float64),
        ],
        dim=-1,
    )


def summarize_channels(stats: ChannelStats) -> dict[str, Tensor]:
    """summarize_moments of one record (its fields [..., C]), as ``{field: float64 tensor}``."""
    count = stats.count.double()
    rows = [None] * 4
    rows[ROW_COUNT], rows[ROW_MEAN], rows[ROW_NONFINITE] = (
        count,
        stats.mean.double(),
        stats.nonfinite.double(),
    )
    rows[ROW_M2] = torch.where(count > 0, stats.var.double() * count, 0.0)
    return dict(zip(FIELDS, summarize_moments(torch.stack(rows, dim=-2)).unbind(-1)))


def summary_values(summary: dict[str, Tensor]) -> dict[str, float | int]:
    """A summary of one gradient (0-dim tensors) as Python numbers, read from the device in one
    transfer: the counts as int, the rest as float (NaN where there is no value; JSON writers
    turn it into null)."""
    values = torch.stack([summary[key] for key in FIELDS]).tolist()
    return {key: int(v) if key in _INTEGER_FIELDS else v for key, v in zip(FIELDS, values)}
