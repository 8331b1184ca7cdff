"""Per-channel gradient statistics: the user-facing records and the state tensor behind them.

A module that records statistics (a recording batch-norm layer, GradProbe) owns one float64
tensor ``grad_stats_state`` (an attribute, not a buffer: see gradstats.modules) of shape
[3, G, 4, C]:
  slot      0 last backward, 1 accumulated since reset, 2 exponential moving average
  gradient  G = 2 for a batch-norm layer: 0 grad_output (dy), 1 grad_input (dx);
            G = 6 for a batch-norm layer recording per-sample terms (per_sample=True): also
            2 grad_weight's and 3 grad_bias's per-sample terms, whose statistics run over
            samples (count = samples) instead of over values, and 4, 5 the same terms'
            per-batch means, one value per backward (count = batches), from which the noise
            estimators separate the noise within a batch from the drift between batches
            (gradstats.sample_stats);
            G = 1 for a probe: the gradient flowing through it
  row       0 count of finite values, 1 their mean, 2 their M2 (sum of squared deviations
            from the mean), 3 count of NaN and infinite values
Statistics describe the finite values only, so one step that diverges cannot poison the
accumulated statistics for the rest of a run; the non-finite values are counted instead.
The backward pass updates it in place on the module's device (gradstats::record_grad_stats_), so
training never waits for the host; ChannelStats / GradStats are snapshots made when read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SLOT_LAST, SLOT_ACCUMULATED, SLOT_EMA = 0, 1, 2
GRAD_OUTPUT, GRAD_INPUT = 0, 1
SAMPLE_GRAD_WEIGHT, SAMPLE_GRAD_BIAS = 2, 3  # per-sample terms (G = 6)
BATCH_MEAN_WEIGHT, BATCH_MEAN_BIAS = 4, 5  # their per-batch means (G = 6)
PER_SAMPLE_GRADIENTS = 6
ROW_COUNT, ROW_MEAN, ROW_M2, ROW_NONFINITE = 0, 1, 2, 3
ROWS = 4


def new_state(num_channels: int, gradients: int = 2, device: torch.device | str | None = None) -> Tensor:
    """An empty statistics state: every slot has count 0."""
    return torch.zeros(3, gradients, ROWS, num_channels, dtype=torch.float64, device=device)


def merge_moments(parts: list[Tensor]) -> Tensor:
    """Chan merge of statistics tensors of one shape [..., 4, C] (rows count, mean, M2,
    nonfinite), e.g. the same module's statistics from several processes: the statistics of all
    their values together. Uses the kernels' own merge (gradstats::record_grad_stats_), on the
    parts' device.
    """
    if not parts:
        raise ValueError("merge_moments needs at least one part")
    shape = parts[0].shape
    if any(p.shape != shape for p in parts):
        raise ValueError(f"merge_moments: parts must share one shape, got {[tuple(p.shape) for p in parts]}")
    rows = shape[-2]
    # Every leading index and channel becomes one "channel" of a single-gradient state.
    flat = [p.to(torch.float64).movedim(-2, 0).reshape(1, rows, -1).contiguous() for p in parts]
    state = torch.zeros(3, 1, rows, flat[0].shape[-1], dtype=torch.float64, device=flat[0].device)
    for part in flat:
        torch.ops.gradstats.record_grad_stats_(state, part, 1.0)
    merged = state[SLOT_ACCUMULATED, 0]  # [rows, K]
    leading = shape[:-2] + shape[-1:]
    return merged.reshape(rows, *leading).movedim(0, -2).contiguous()


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one gradient tensor over (N, H, W), as [C] tensors on the
    module's device.

    count: int64, finite values per channel (for a moving average: the decayed count, rounded).
    mean, var: float64 mean and population variance (correction=0, as torch.var_mean(...,
        correction=0)) of the finite values; NaN for a channel with none.
    nonfinite: int64, NaN and infinite values per channel, which mean and var leave out.
    """

    count: Tensor
    mean: Tensor
    var: Tensor
    nonfinite: Tensor

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    @classmethod
    def from_moments(cls, moments: Tensor) -> ChannelStats:
        """From a [4, C] (count, mean, M2, nonfinite) tensor; copies, so later updates do not
        leak in."""
        count, mean, m2, nonfinite = moments.unbind(0)
        have = count > 0
        nan = torch.full_like(mean, float("nan"))
        return cls(
            count=count.round().to(torch.int64),
            mean=torch.where(have, mean, nan),
            var=torch.where(have, m2 / torch.where(have, count, 1.0), nan),
            nonfinite=nonfinite.round().to(torch.int64),
        )


@dataclass(frozen=True)
class GradStats:
    """Statistics of the gradient a layer received (grad_output, dy) and the one it passed on
    towards its input (grad_input, dx). For a probe, which passes the gradient on unchanged,
    both are the same record."""

    grad_output: ChannelStats
    grad_input: ChannelStats

    @classmethod
    def from_slot(cls, slot: Tensor) -> GradStats | None:
        """From one [G, 4, C] slot of a state buffer; None when it holds no backward yet.
        Reading it synchronises with the device once (for that check)."""
        first = slot[GRAD_OUTPUT, :, 0]
        if slot.shape[-1] == 0 or not bool(first[ROW_COUNT] + first[ROW_NONFINITE] > 0):
            return None
        grad_output = ChannelStats.from_moments(slot[GRAD_OUTPUT])
        grad_input = ChannelStats.from_moments(slot[GRAD_INPUT]) if slot.shape[0] > 1 else grad_output
        return cls(grad_output=grad_output, grad_input=grad_input)


@dataclass(frozen=True)
class PerSampleStats:
    """Statistics over samples of a batch-norm layer's per-sample parameter-gradient terms: per
    channel, the count of samples (count), mean and population variance over them of sample n's
    term of grad_weight (sum over its positions of dy * x_hat) and of grad_bias (sum of dy).
    Samples whose term is NaN or infinite are counted in nonfinite and left out."""

    grad_weight: ChannelStats
    grad_bias: ChannelStats

    @classmethod
    def from_slot(cls, slot: Tensor) -> PerSampleStats | None:
        """From one [6, 4, C] slot of a per-sample state; None when the layer records no
        per-sample terms or none yet."""
        if slot.shape[0] <= SAMPLE_GRAD_BIAS:
            return None
        first = slot[SAMPLE_GRAD_WEIGHT, :, 0]
        if slot.shape[-1] == 0 or not bool(first[ROW_COUNT] + first[ROW_NONFINITE] > 0):
            return None
        return cls(
            grad_weight=ChannelStats.from_moments(slot[SAMPLE_GRAD_WEIGHT]),
            grad_bias=ChannelStats.from_moments(slot[SAMPLE_GRAD_BIAS]),
        )
