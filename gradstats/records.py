"""A flat view of a model's gradient statistics for any logger: ``metrics(model)`` gives
``{"gradstats/<stage>/<layer>/<quantity>": float}`` for every BatchNorm layer and every residual
block probe, read from the device in one copy whatever the number of layers.

The same per-layer summary serves the tools: ``layer_summaries`` (from a model) and
``summarize_slots`` (from statistics already merged across ranks) return one dict per layer,
which `gradstats train` writes to stats.jsonl, health alerts (gradstats.alerts) read, and
``flatten`` turns into the metric names.

Per layer and gradient (dy and dx of a BN layer; the gradient ``grad`` at a block's output):
    mean, var       per-channel mean and population variance, averaged over the channels that
                    have finite values (NaN-aware: a channel without any finite value does not
                    turn the average into NaN; NaN only when no channel has one)
    var_min/max     over those channels
    nonfinite       NaN/Inf values (left out of mean and var), all channels together
    dead            channels with finite values whose variance is exactly zero
    count           values per channel (the largest over channels)
plus, for a BN layer, ``dx_over_dy``: dx variance / dy variance (both channel-averaged), and, for
a block, ``grad_var_ratio``: its gradient variance / the next block's (output side), the
block-to-block growth towards the input of docs/analysis.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .convert import batchnorms, probes
from .sample_stats import FIELDS as SAMPLE_FIELDS
from .sample_stats import layer_fields, noise_scale_of
from .stats import SAMPLE_GRAD_WEIGHT, SLOT_ACCUMULATED, SLOT_EMA, SLOT_LAST
from .summary import FIELDS, summarize_moments

SLOTS = {"last": SLOT_LAST, "accumulated": SLOT_ACCUMULATED, "ema": SLOT_EMA}
BN_GRADIENTS = ("dy", "dx")
BLOCK_GRADIENTS = ("grad",)
PROBE_SUFFIX = ".grad_probe"
# Per-sample quantities a BN layer with per_sample=True adds to the flat view.
LOGGED_SAMPLE_FIELDS = ("noise_scale", "gsnr_weight", "gsnr_bias", "dy_between_fraction")
# Wrappers' names are not part of the model's layer names: DistributedDataParallel's "module."
# (leading), torch.compile's "_orig_mod." (anywhere).


def layer_name(name: str) -> str:
    """A recording module's name as the model defines it: wrapper components dropped, a probe
    named after its block."""
    parts = [p for p in name.removesuffix(PROBE_SUFFIX).split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts) or name


def _without_common_head(names: list[str]) -> list[str]:
    """``names`` without the leading components they all share (the attribute a LightningModule
    or another wrapper keeps the network in), so that stages are the network's own."""
    split = [n.split(".") for n in names]
    while len(split) > 0 and all(len(p) > 1 for p in split) and len({p[0] for p in split}) == 1:
        split = [p[1:] for p in split]
    return [".".join(p) for p in split]


def stage_of(name: str) -> str:
    """The group a layer is folded into on dashboards: its top-level container ("layer1"), or
    "stem" for a layer directly under the model (the first convolution's BN)."""
    head, dot, _ = name.partition(".")
    return head if dot else "stem"


def _stacked(slots: list[Tensor]) -> Tensor:
    """[L, G, rows, Cmax]: [G, rows, C] slots of one G stacked, whatever their channel counts
    (padded with empty channels, count 0, which every summary leaves out)."""
    # pad_sequence pads the first dimension: [C, G * rows] per layer -> [L, Cmax, G * rows].
    g, rows = slots[0].shape[0], slots[0].shape[1]
    padded = pad_sequence([s.reshape(g * rows, -1).t() for s in slots], batch_first=True)
    return padded.reshape(len(slots), -1, g, rows).permute(0, 2, 3, 1)


def _reduce(slots: list[Tensor]) -> Tensor:
    """[L, G, len(FIELDS)] float64: the summary (gradstats.summary) of every [G, rows, C] slot, on
    their device, in a fixed number of operations whatever L."""
    return summarize_moments(_stacked(slots))


def summarize_slots(
    bn_slots: list[tuple[str, Tensor]], block_slots: list[tuple[str, Tensor]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-layer summaries (see the module docstring) of BN layers' [2, rows, C] (or [6, rows,
    C] with per-sample terms) and probes' [1, rows, C] statistics (one slot each: count, mean,
    M2, nonfinite rows), as two lists of dicts ``{"name", "stage", "channels", "count",
    "dy_mean", "dy_var", ..., "dx_over_dy"}`` and ``{"name", ..., "grad_var", ...,
    "grad_var_ratio"}``; a BN layer with per-sample terms adds gradstats.sample_stats.FIELDS
    (``noise_scale``, ``gsnr_weight``, ...). The reductions run on the slots' device; their
    results come to the host in one copy. A layer that saw no backward has NaN moments.
    """
    sampled = [slot for _, slot in bn_slots if slot.shape[0] > SAMPLE_GRAD_WEIGHT]
    dy_dx = [(name, slot[:SAMPLE_GRAD_WEIGHT]) for name, slot in bn_slots]
    parts = [_reduce([s for _, s in group]).reshape(-1) for group in (dy_dx, block_slots) if group]
    if sampled:
        parts.append(layer_fields(_stacked(sampled)).reshape(-1))
    values = torch.cat(parts).cpu().tolist() if parts else []  # the one device-to-host copy
    fields = len(FIELDS)
    out: list[list[dict[str, Any]]] = []
    offset = 0
    for group, gradients in ((dy_dx, BN_GRADIENTS), (block_slots, BLOCK_GRADIENTS)):
        records = []
        for name, slot in group:
            record: dict[str, Any] = {"name": name, "stage": stage_of(name), "channels": slot.shape[-1]}
            for gradient in gradients:
                row = dict(zip(FIELDS, values[offset : offset + fields]))
                offset += fields
                record["count"] = max(record.get("count", 0), int(row.pop("count")))
                record.update({f"{gradient}_{key}": value for key, value in row.items()})
                record[f"{gradient}_nonfinite"] = int(record[f"{gradient}_nonfinite"])
                record[f"{gradient}_dead"] = int(record[f"{gradient}_dead"])
            records.append(record)
        out.append(records)
    bn_records, block_records = out
    for record, (_, slot) in zip(bn_records, bn_slots):
        record["dx_over_dy"] = _ratio(record["dx_var"], record["dy_var"])
        if slot.shape[0] > SAMPLE_GRAD_WEIGHT:
            record.update(zip(SAMPLE_FIELDS, values[offset : offset + len(SAMPLE_FIELDS)]))
            record["samples"] = int(record["samples"])
            offset += len(SAMPLE_FIELDS)
    for record, following in zip(block_records, block_records[1:] + [None]):
        below = None if following is None else following["grad_var"]
        record["grad_var_ratio"] = None if below is None else _ratio(record["grad_var"], below)
    return bn_records, block_records


def model_noise_scale(bn_records: list[dict[str, Any]]) -> float | None:
    """B_simple of every BN parameter of the model together (the layers' tr(Sigma) and |G|^2
    added up); None when no layer records per-sample terms."""
    sampled = [r for r in bn_records if "trace_sigma" in r]
    if not sampled:
        return None
    return noise_scale_of(sum(r["trace_sigma"] for r in sampled), sum(r["grad_sq_norm"] for r in sampled))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def recorders(model: nn.Module):
    """(bn layers, block probes): ``(layer name, module)`` of every GradStatBatchNorm2d and
    GradProbe of ``model``, each in module order, named by layer_name without the components
    all of them share."""
    bns = batchnorms(model)
    found = bns + probes(model)
    names = _without_common_head([layer_name(name) for name, _ in found])
    named = [(name, m) for name, (_, m) in zip(names, found)]
    return named[: len(bns)], named[len(bns) :]


def recorder_slots(model: nn.Module, which: str = "accumulated"):
    """(bn_slots, block_slots): ``(layer name, [G, rows, C] slot)`` of every recording module of
    ``model`` (recorders), on their device (views, no copy)."""
    if which not in SLOTS:
        raise ValueError(f"which: expected one of {', '.join(SLOTS)}, got {which!r}")
    slot = SLOTS[which]
    bns, blocks = recorders(model)
    return (
        [(name, m.grad_stats_state[slot]) for name, m in bns],
        [(name, m.grad_stats_state[slot]) for name, m in blocks],
    )


def layer_summaries(model: nn.Module, which: str = "accumulated"):
    """summarize_slots of ``model``'s recording modules (``which``: "last", "accumulated" or
    "ema"): (bn layer records, block records), one device-to-host copy."""
    return summarize_slots(*recorder_slots(model, which))


def flatten(
    bn_records: list[dict[str, Any]], block_records: list[dict[str, Any]], prefix: str = "gradstats/"
) -> dict[str, float]:
    """``{prefix + stage/layer/quantity: float}`` from the per-layer records."""
    flat: dict[str, float] = {}
    for records, gradients, extra in (
        (bn_records, BN_GRADIENTS, ("dx_over_dy",)),
        (block_records, BLOCK_GRADIENTS, ("grad_var_ratio",)),
    ):
        for record in records:
            base = f"{prefix}{record['stage']}/{record['name']}/"
            keys = [f"{g}_{f}" for g in gradients for f in ("mean", "var", "nonfinite", "dead")] + list(extra)
            keys += [key for key in LOGGED_SAMPLE_FIELDS if key in record]
            for key in keys:
                value = record[key]
                if value is not None:
                    flat[base + key] = float(value)
    noise = model_noise_scale(bn_records)
    if noise is not None:
        flat[prefix + "model/noise_scale"] = noise
    return flat


def metrics(model: nn.Module, *, which: str = "accumulated", prefix: str = "gradstats/") -> dict[str, float]:
    """Every recording module's statistics as ``{name: float}``, for any logger
    (``logger.log_metrics(gradstats.metrics(model), step)``, ``wandb.log``, ``add_scalar``).

    Names are ``prefix + stage + "/" + layer + "/" + quantity``, stage being the layer's top-level
    container ("layer1", or "stem"), so dashboards fold them per stage. Per BN layer: ``dy_mean``,
    ``dy_var``, ``dx_mean``, ``dx_var`` (channel averages, NaN-aware), ``dy_nonfinite``,
    ``dx_nonfinite`` (NaN/Inf values), ``dy_dead``, ``dx_dead`` (channels of zero variance),
    ``dx_over_dy`` (variance ratio); per residual block probe: ``grad_mean``, ``grad_var``,
    ``grad_nonfinite``, ``grad_dead`` and ``grad_var_ratio`` (this block's variance / the next
    one's, absent for the last block). Layers recording per-sample terms (per_sample=True) add
    ``noise_scale`` (B_simple), ``gsnr_weight``, ``gsnr_bias`` (channel averages) and
    ``dy_between_fraction`` (the share of dy's variance between samples), and the model
    ``prefix + "model/noise_scale"`` (gradstats.sample_stats defines them). ``which``:
    "accumulated" (since the last reset_grad_stats(), default), "last" (the last backward) or
    "ema". One device-to-host copy
    for the whole model.
    """
    return flatten(*layer_summaries(model, which), prefix=prefix)
