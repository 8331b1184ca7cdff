"""What `gradstats train` writes: one JSON object per logging step in OUT/stats.jsonl (and the
same numbers to TensorBoard / Weights & Biases through gradstats.tools.writers), and at the end
the plots of gradient variance per residual block over training.

A stats.jsonl record:
    {"step", "epoch", "lr", "train_loss", "train_acc", "samples", "images_per_s", "elapsed_s",
     "bn_layers": [{"name", "stage", "channels", "count", "dy_mean", "dy_var", "dy_var_min",
                    "dy_var_max", "dy_nonfinite", "dy_dead", "dx_...": the same for dx,
                    "dx_over_dy", with --per-sample also "samples", "trace_sigma",
                    "grad_sq_norm", "noise_scale", "gsnr_weight", "gsnr_bias", "dy_between",
                    "dy_within", "dy_between_fraction" (gradstats.sample_stats)}],
     "blocks": [{"name", "stage", "channels", "count", "grad_mean", "grad_var", "grad_var_min",
                 "grad_var_max", "grad_nonfinite", "grad_dead", "grad_var_ratio"}],
     "alerts": [{"kind", "layer", "step", "message"}],
     "noise_scale": the model's B_simple (with --per-sample)}
The per-layer entries are gradstats.records.summarize_slots' (its docstring defines them) over
the interval since the last record; "alerts" are gradstats.alerts.check's for this record.
Non-finite numbers become null.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from ..records import flatten
from .plots import block_variance_curves, noise_scale_curves, variance_heatmap
from .safe_files import open_in, replace_in

STATS_FILE = "stats.jsonl"


def finite(value):
    """``value`` with NaN and infinities replaced by None, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


TRAINING_SCALARS = ("train_loss", "train_acc", "lr", "images_per_s")


class StatsLog:
    """Appends records to OUT/stats.jsonl (flushed per record) and hands their numbers to
    ``writers`` (gradstats.tools.writers): the training curves as ``train/...``, the layers'
    statistics under gradstats.metrics names, and per-channel histograms when given."""

    def __init__(self, out: str, writers=()) -> None:
        self.path = os.path.join(out, STATS_FILE)
        self.file = open_in(out, STATS_FILE, "a")  # never appends through a link planted there
        self.writers = list(writers)

    def write(self, record: dict[str, Any], histograms: dict[str, np.ndarray] | None = None) -> None:
        self.file.write(json.dumps(finite(record), allow_nan=False) + "\n")
        self.file.flush()
        if self.writers:
            scalars = {f"train/{k}": record[k] for k in TRAINING_SCALARS if record.get(k) is not None}
            scalars.update(flatten(record["bn_layers"], record["blocks"]))
            for writer in self.writers:
                writer.write(record["step"], scalars, histograms)

    def scalar(self, tag: str, value: float, step: int) -> None:
        for writer in self.writers:
            writer.write(step, {tag: value})

    def close(self) -> None:
        self.file.close()
        for writer in self.writers:
            writer.close()


def read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_records(path: str, last_step: int) -> None:
    """Drops records after ``last_step`` (written after the checkpoint a run resumes from, and
    about to be written again), and a last line cut short by a crash. A link at ``path`` is
    refused (OSError naming it), not read: that would copy another file into the run folder."""
    if not os.path.lexists(path):
        return
    folder, name = os.path.split(path)
    kept = []
    with open_in(folder, name, "r") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record["step"] > last_step:
                break
            kept.append(line if line.endswith("\n") else line + "\n")
    replace_in(folder, name, lambda f: f.writelines(kept))


# -- plots ----------------------------------------------------------------------------------------


def plot_block_variance(records: list[dict[str, Any]], out: str) -> list[str]:
    """Two PNGs in ``out``: gradient variance per residual block over training (heat map, block
    x logged step, log10 colour) and the per-block curve at the first and last logged steps,
    each a new file renamed over its name (gradstats.tools.safe_files.replace_in). Returns their
    paths (none without records holding block statistics)."""
    records = [r for r in records if r["blocks"] and r["blocks"][0].get("grad_var") is not None]
    if not records:
        return []
    names = [b["name"] for b in records[0]["blocks"]]
    steps = [r["step"] for r in records]
    var = np.array([[b.get("grad_var") or np.nan for b in r["blocks"]] for r in records], dtype=float).T
    fig = variance_heatmap(
        names,
        steps,
        var,
        "gradient variance at block outputs (mean over channels)",
        range(len(names)),
        names,
        ylabel="residual block (input side at top)",
    )
    heatmap = replace_in(out, "grad_var_heatmap.png", lambda f: fig.savefig(f, format="png", dpi=110), True)

    every = max(1, len(names) // 30)
    fig = block_variance_curves(
        names,
        steps,
        var,
        sorted({0, len(records) - 1}),
        range(0, len(names), every),
        names[::every],
        "gradient variance per block, first and last logged steps",
    )
    curves = replace_in(out, "grad_var_blocks.png", lambda f: fig.savefig(f, format="png", dpi=110), True)
    return [heatmap, curves]


def plot_noise_scale(records: list[dict[str, Any]], out: str) -> list[str]:
    """``noise_scale.png`` in ``out``: the gradient noise scale over training and against the
    training loss, from runs with --per-sample (none otherwise): the model's, and each BN
    layer's that is defined in at least half the records. Returns its path."""
    records = [r for r in records if "noise_scale" in r]
    if not records:
        return []
    fig = noise_scale_curves(*noise_scale_series(records), "noise scale against training loss")
    return [replace_in(out, "noise_scale.png", lambda f: fig.savefig(f, format="png", dpi=110), True)]


def noise_scale_series(records: list[dict[str, Any]]):
    """(steps, model B_simple, train loss, {layer: B_simple}) of --per-sample records, the
    layers being those with a defined value in at least half of them. Records may come from an
    untrusted run folder (gradstats report): any value that is not a number reads as NaN."""
    steps = [r["step"] for r in records]
    noise = np.array([finite_number(r.get("noise_scale")) for r in records], dtype=float)
    loss = np.array([finite_number(r.get("train_loss")) for r in records], dtype=float)
    layers = {}
    for i, first in enumerate(_layer_entries(records[0])):
        values = np.array(
            [finite_number(_layer_value(r, i, "noise_scale")) for r in records],
            dtype=float,
        )
        if (np.isfinite(values) & (values > 0)).sum() * 2 >= len(records):
            layers[str(first.get("name"))] = values
    return steps, noise, loss, layers


def _layer_entries(record: dict[str, Any]) -> list[dict[str, Any]]:
    entries = record.get("bn_layers")
    return [e if isinstance(e, dict) else {} for e in entries] if isinstance(entries, list) else []


def _layer_value(record: dict[str, Any], index: int, key: str):
    entries = _layer_entries(record)
    return entries[index].get(key) if index < len(entries) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_number(value: Any) -> float:
    """A finite float from a record value, NaN for anything else (null, strings, lists, an
    integer too big for a float)."""
    if not _is_number(value):
        return math.nan
    try:
        value = float(value)
    except OverflowError:
        return math.nan
    return value if math.isfinite(value) else math.nan
