"""What `gradstats train` writes: one JSON object per logging step in OUT/stats.jsonl (and
TensorBoard scalars when tensorboard is installed), and at the end the plots of gradient
variance per residual block over training.

A stats.jsonl record:
    {"step", "epoch", "lr", "train_loss", "train_acc", "samples", "images_per_s", "elapsed_s",
     "bn_layers": [{"name", "channels", "count", "dy_mean", "dy_var", "dy_var_min", "dy_var_max",
                    "dy_nonfinite", "dx_...": the same for dx}],
     "blocks": [{"name", "channels", "count", "grad_mean", "grad_var", "grad_var_min",
                 "grad_var_max", "grad_nonfinite"}]}
Per layer: "count" is values per channel since the last record; the rest is
gradstats.summary.summarize_channels: "*_mean" and "*_var" are the per-channel mean and
(population) variance averaged over the channels with finite values; min/max are over those
channels; "*_nonfinite" counts NaN/Inf values (left out of the moments). Non-finite numbers
become null.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from torch import Tensor

from ..stats import ChannelStats, GradStats
from ..summary import summarize_channels, summary_values

STATS_FILE = "stats.jsonl"


def _channels(c: ChannelStats, prefix: str) -> dict[str, Any]:
    summary = summary_values(summarize_channels(c))
    return {prefix + key: summary[key] for key in ("mean", "var", "var_min", "var_max", "nonfinite")}


def layer_record(name: str, merged: Tensor) -> dict[str, Any]:
    """The record of one module from its merged [G, rows, C] statistics (G = 2: a BN layer's dy
    and dx; G = 1: a probe's gradient)."""
    record: dict[str, Any] = {"name": name, "channels": merged.shape[-1]}
    stats = GradStats.from_slot(merged)
    if stats is None:  # the module saw no backward in this interval
        return record
    record["count"] = int(stats.grad_output.count.max().item())
    if merged.shape[0] == 1:
        record.update(_channels(stats.grad_output, "grad_"))
    else:
        record.update(_channels(stats.grad_output, "dy_"))
        record.update(_channels(stats.grad_input, "dx_"))
    return record


def _is_number(value) -> bool:
    return value is not None and math.isfinite(value)


def finite(value):
    """``value`` with NaN and infinities replaced by None, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class StatsLog:
    """Appends records to OUT/stats.jsonl (flushed per record) and, if tensorboard is
    installed and wanted, to TensorBoard event files in OUT/tensorboard."""

    def __init__(self, out: str, tensorboard: bool = True) -> None:
        self.path = os.path.join(out, STATS_FILE)
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional (ImportError, or a broken install)
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(finite(record), allow_nan=False) + "\n")
        self.file.flush()
        if self.writer is not None:
            self._tensorboard(record)

    def _tensorboard(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key in ("train_loss", "train_acc", "lr", "images_per_s"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        for layer in record["bn_layers"]:
            for key in ("dy_var", "dx_var"):
                if _is_number(layer.get(key)):
                    self.writer.add_scalar(f"bn_{key}/{layer['name']}", layer[key], step)
        for block in record["blocks"]:
            if _is_number(block.get("grad_var")):
                self.writer.add_scalar(f"block_grad_var/{block['name']}", block["grad_var"], step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_records(path: str, last_step: int) -> None:
    """Drops records after ``last_step`` (written after the checkpoint a run resumes from, and
    about to be written again), and a last line cut short by a crash."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record["step"] > last_step:
                break
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


# -- plots ----------------------------------------------------------------------------------------


def plot_block_variance(records: list[dict[str, Any]], out: str) -> list[str]:
    """Two PNGs in ``out``: gradient variance per residual block over training (heat map, block
    x logged step, log10 colour) and the per-block curve at the first and last logged steps.
    Returns their paths (none without records holding block statistics)."""
    records = [r for r in records if r["blocks"] and r["blocks"][0].get("grad_var") is not None]
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [b["name"] for b in records[0]["blocks"]]
    steps = [r["step"] for r in records]
    var = np.array([[b.get("grad_var") or np.nan for b in r["blocks"]] for r in records], dtype=float).T
    with np.errstate(divide="ignore", invalid="ignore"):
        logvar = np.log10(np.where(var > 0, var, np.nan))

    heatmap = os.path.join(out, "grad_var_heatmap.png")
    fig, ax = plt.subplots(
        figsize=(max(7.5, min(14.0, 0.15 * len(steps) + 5)), max(3.5, 0.22 * len(names) + 1.8))
    )
    image = ax.imshow(
        logvar,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(-0.5, len(steps) - 0.5, len(names) - 0.5, -0.5),
    )
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("training step (end of logging interval)")
    ax.set_ylabel("residual block (input side at top)")
    ax.set_title("gradient variance at block outputs (mean over channels)", fontsize=10)
    fig.colorbar(image, ax=ax, label="log10 variance")
    fig.tight_layout()
    fig.savefig(heatmap, dpi=110)
    plt.close(fig)

    curves = os.path.join(out, "grad_var_blocks.png")
    fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(names) + 2), 4.5))
    for index, style in ((0, "o-"), (len(records) - 1, "s--")):
        ax.plot(range(len(names)), var[:, index], style, ms=3, label=f"step {steps[index]}")
        if len(records) == 1:
            break
    ax.set_yscale("log")
    every = max(1, len(names) // 30)
    ax.set_xticks(range(0, len(names), every), names[::every], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("residual block (input side -> output side)")
    ax.set_ylabel("gradient variance (mean over channels)")
    ax.set_title("gradient variance per block, first and last logged steps", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [heatmap, curves]
