"""Where `gradstats train` sends its numbers besides stats.jsonl: TensorBoard event files and
Weights & Biases runs. Both get the same scalars (gradstats.metrics names plus the training
curves) and, per layer, the distribution over channels of log10 dy and dx variance (block
probes: of the gradient) as a histogram built from the per-channel values the record already
holds (no extra pass: ``add_histogram_raw``, ``wandb.Histogram(np_histogram=...)``)."""

from __future__ import annotations

import os

import numpy as np
from torch import Tensor

from ..extras import require
from ..records import BLOCK_GRADIENTS, BN_GRADIENTS, stage_of
from ..stats import ChannelStats
from .safe_files import refuse_link

HISTOGRAM_BINS = 30


def channel_log10_variances(
    bn_slots: list[tuple[str, Tensor]], block_slots: list[tuple[str, Tensor]], prefix: str = "gradstats/"
) -> dict[str, np.ndarray]:
    """``{prefix + stage/layer/dy_log10_var: values}``: log10 of every channel's variance, from
    [G, rows, C] CPU statistics (merged records); channels without finite values or of zero
    variance (the dead ones, which the scalars count) are left out."""
    out = {}
    for slots, gradients in ((bn_slots, BN_GRADIENTS), (block_slots, BLOCK_GRADIENTS)):
        for name, slot in slots:
            for index, gradient in enumerate(gradients):
                var = ChannelStats.from_moments(slot[index]).var.numpy()
                var = var[np.isfinite(var) & (var > 0)]
                out[f"{prefix}{stage_of(name)}/{name}/{gradient}_log10_var"] = np.log10(var)
    return out


def histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of ``values`` over HISTOGRAM_BINS equal bins between their extremes."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return np.histogram(values, bins=HISTOGRAM_BINS, range=(lo, hi))


class TensorBoardWriter:
    """Scalars and histograms to OUT/tensorboard. ``purge_step``: a resumed run's first step,
    so that events a crashed run wrote after its checkpoint are hidden, not duplicated. A link
    at OUT/tensorboard is refused (the library would write through it)."""

    def __init__(self, out: str, purge_step: int | None = None) -> None:
        refuse_link(out, "tensorboard")
        tensorboard = require("torch.utils.tensorboard", "TensorBoard logging")
        self.writer = tensorboard.SummaryWriter(os.path.join(out, "tensorboard"), purge_step=purge_step)

    def write(
        self, step: int, scalars: dict[str, float], histograms: dict[str, np.ndarray] | None = None
    ) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, data in (histograms or {}).items():
            if not data.size:
                continue
            counts, edges = histogram(data)
            self.writer.add_histogram_raw(
                tag,
                min=float(data.min()),
                max=float(data.max()),
                num=int(data.size),
                sum=float(data.sum()),
                sum_squares=float((data * data).sum()),
                bucket_limits=edges[1:],
                bucket_counts=counts,
                global_step=step,
            )

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """The same to a Weights & Biases run of ``project`` (files in OUT/wandb; offline with
    WANDB_MODE=offline). ``run_id``: the run to continue on --resume. A link at OUT/wandb is
    refused (the library would write through it)."""

    def __init__(self, out: str, project: str, config: dict, run_id: str | None = None) -> None:
        refuse_link(out, "wandb")
        self.wandb = require("wandb", "--wandb")
        self.run = self.wandb.init(
            project=project, dir=out, config=config, id=run_id, resume="allow" if run_id else None
        )
        self.run_id = self.run.id

    def write(
        self, step: int, scalars: dict[str, float], histograms: dict[str, np.ndarray] | None = None
    ) -> None:
        values: dict = dict(scalars)
        for tag, data in (histograms or {}).items():
            if data.size:
                values[tag] = self.wandb.Histogram(np_histogram=histogram(data))
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
