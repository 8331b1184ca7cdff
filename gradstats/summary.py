"""Summaries of per-channel statistics into a few numbers per gradient: the one definition that
training logs, `gradstats analyze`, `gradstats demo` and the trainer report.

A channel can hold no finite value in an interval (every gradient value NaN or infinite): its
mean and var are NaN (see ChannelStats). Averages over channels leave such channels out
(nanmean), so that one poisoned channel does not hide the others; ``nonfinite`` says how many
values were left out. A summary is NaN only when no channel had a finite value.

The work is tensor arithmetic on the statistics' device, over the last (channel) dimension, so
it also takes ChannelStats whose fields are stacked [..., C] tensors (several modules at once)
and reads nothing back: ``summary_values`` does that, in one transfer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stats import ChannelStats

# The summary's keys; every value is a float64 tensor of the leading shape ([] for one gradient).
SUMMARY_KEYS = ("count", "mean", "var", "var_min", "var_max", "nonfinite")
_INTEGER_KEYS = ("count", "nonfinite")


def summarize_channels(stats: ChannelStats) -> dict[str, Tensor]:
    """Per gradient, over its channels:

    count       finite values in the channel with the most (the values per channel)
    mean, var   per-channel mean and population variance averaged over the channels that had
                finite values (NaN if none had)
    var_min, var_max  the smallest and largest of those per-channel variances (NaN if none)
    nonfinite   NaN and infinite values, summed over channels
    """
    var = stats.var.double()
    have = ~var.isnan()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=var.device)
    any_finite = have.any(-1)
    return {
        "count": stats.count.amax(-1).double(),
        "mean": stats.mean.double().nanmean(-1),
        "var": var.nanmean(-1),
        "var_min": torch.where(any_finite, var.masked_fill(~have, math.inf).amin(-1), nan),
        "var_max": torch.where(any_finite, var.masked_fill(~have, -math.inf).amax(-1), nan),
        "nonfinite": stats.nonfinite.sum(-1).double(),
    }


def summary_values(summary: dict[str, Tensor]) -> dict[str, float | int]:
    """A summary of one gradient (0-dim tensors) as Python numbers, read from the device in one
    transfer: the counts as int, the rest as float (NaN where there is no value; JSON writers
    turn it into null)."""
    values = torch.stack([summary[key] for key in SUMMARY_KEYS]).tolist()
    return {key: int(v) if key in _INTEGER_KEYS else v for key, v in zip(SUMMARY_KEYS, values)}
