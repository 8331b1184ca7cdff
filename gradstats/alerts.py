"""Health alerts read from gradient-statistics records, with no extra pass over anything: pure
functions (check_model aside, which may look up where NaN/Inf appeared) over the per-layer
records of gradstats.metrics (a `gradstats train` stats.jsonl
record, or ``layer_summaries(model)``).

An alert is ``{"kind", "layer", "step", "message"}``; the kinds:
    dx_over_dy      a BN layer whose dx/dy variance ratio leaves the band
                    [expected / band, expected * band]
    dead_channels   a BN layer with channels whose dy variance is exactly zero
    exploding       a residual block whose gradient variance exceeds the next block's (output
                    side) by more than ``block_ratio`` times, within a stage
    vanishing       ... or is below 1 / ``block_ratio`` times it
    nonfinite       NaN/Inf gradient values, at the first layer that met them
Why these thresholds: docs/analysis.md ("Health alerts").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .nonfinite import first_nonfinite
from .records import layer_name

__all__ = ["AlertThresholds", "Alert", "check", "check_model", "started"]

NONFINITE_KEYS = ("dy_nonfinite", "dx_nonfinite", "grad_nonfinite")

Alert = dict[str, Any]


@dataclass(frozen=True)
class AlertThresholds:
    """When a record raises an alert (reasons in docs/analysis.md)."""

    # Train-mode BN: var dx = (w / sigma_x)^2 (var dy - cov(dy, x_hat)^2) per channel; for
    # He-initialised ReLU convolutions the ratio is pi / (pi - 1) (Panigrahi et al.).
    dx_over_dy_expected: float = math.pi / (math.pi - 1)
    # An order of magnitude either way in one layer: compounded over a handful of layers that is
    # the gradient exploding or vanishing, and healthy layers stay well inside it.
    dx_over_dy_band: float = 10.0
    # Block-to-block variance ratio within a stage: an order of magnitude per block. A healthy BN
    # ResNet shows up to 3.1 at initialisation and up to 5.1 while it trains (docs/analysis.md).
    block_ratio: float = 10.0
    # Channels of zero dy variance in one layer before it is reported.
    dead_channels: int = 1

    def __post_init__(self) -> None:
        for name in ("dx_over_dy_expected", "dx_over_dy_band", "block_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.dx_over_dy_band < 1 or self.block_ratio < 1:
            raise ValueError(
                f"dx_over_dy_band and block_ratio are factors >= 1, got {self.dx_over_dy_band}, "
                f"{self.block_ratio}"
            )
        if not (isinstance(self.dead_channels, int) and self.dead_channels >= 1):
            raise ValueError(f"dead_channels must be an integer >= 1, got {self.dead_channels!r}")


def _alert(kind: str, layer: str, step: int, message: str) -> Alert:
    return {"kind": kind, "layer": layer, "step": int(step), "message": message}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check(
    record: dict[str, Any],
    thresholds: AlertThresholds = AlertThresholds(),
    nonfinite_site: tuple[str, str] | None = None,
) -> list[Alert]:
    """Every alert ``record`` raises: a dict with ``step``, ``bn_layers`` and ``blocks`` as
    gradstats.records.summarize_slots gives them. ``nonfinite_site``: (layer, description) of the
    first layer that met NaN/Inf values (gradstats.first_nonfinite), when known; without it the
    nonfinite alert names the last layer, in module order, that counted some."""
    step = record["step"]
    alerts: list[Alert] = []
    low = thresholds.dx_over_dy_expected / thresholds.dx_over_dy_band
    high = thresholds.dx_over_dy_expected * thresholds.dx_over_dy_band
    for layer in record["bn_layers"]:
        ratio = layer.get("dx_over_dy")
        if _finite(ratio) and not low <= ratio <= high:
            alerts.append(
                _alert(
                    "dx_over_dy",
                    layer["name"],
                    step,
                    f"{layer['name']}: dx/dy gradient variance ratio {ratio:.3g} is outside "
                    f"[{low:.3g}, {high:.3g}] (expected about {thresholds.dx_over_dy_expected:.3g})",
                )
            )
        dead = layer.get("dy_dead") or 0
        if dead >= thresholds.dead_channels:
            alerts.append(
                _alert(
                    "dead_channels",
                    layer["name"],
                    step,
                    f"{layer['name']}: {dead} of {layer['channels']} channels received a gradient "
                    f"of zero variance (dead)",
                )
            )
    blocks = record["blocks"]
    for block, following in zip(blocks, blocks[1:]):
        ratio = block.get("grad_var_ratio")
        if block.get("stage") != following.get("stage") or not _finite(ratio):
            continue  # a stage transition changes resolution and width: a ratio of its own
        if ratio > thresholds.block_ratio or ratio < 1 / thresholds.block_ratio:
            kind = "exploding" if ratio > 1 else "vanishing"
            alerts.append(
                _alert(
                    kind,
                    block["name"],
                    step,
                    f"{block['name']}: gradient variance {ratio:.3g} times that of {following['name']} "
                    f"(limit {thresholds.block_ratio:g}x per block): {kind} towards the input",
                )
            )
    counted = [
        layer
        for layer in record["bn_layers"] + blocks
        if any((layer.get(k) or 0) > 0 for k in NONFINITE_KEYS)
    ]
    if counted:
        total = sum((layer.get(k) or 0) for layer in counted for k in NONFINITE_KEYS)
        if nonfinite_site is not None:
            name, where = nonfinite_site
        else:
            name = counted[-1]["name"]
            where = f"{name} (the last recording layer, in module order, that counted them)"
        alerts.append(
            _alert(
                "nonfinite",
                name,
                step,
                f"{total} NaN/Inf gradient values since the last record; first met at {where}",
            )
        )
    return alerts


def check_model(
    record: dict[str, Any], model, thresholds: AlertThresholds = AlertThresholds()
) -> list[Alert]:
    """check(), with the first layer that met NaN/Inf values looked up in ``model``
    (gradstats.first_nonfinite: its last backward, read from the device) when the record counts
    some; nothing is read otherwise."""
    site = None
    if any(layer.get(k) for layer in record["bn_layers"] + record["blocks"] for k in NONFINITE_KEYS):
        found = first_nonfinite(model)
        site = None if found is None else (layer_name(found.name), str(found))
    return check(record, thresholds, site)


def started(alerts: list[Alert], active: set[tuple[str, str]]) -> tuple[list[Alert], set[tuple[str, str]]]:
    """The alerts of one record that were not raised by the record before (``active``: their
    (kind, layer) pairs), and the pairs active now: an alert is reported once when it starts,
    and again only if it stops and starts again."""
    now = {(a["kind"], a["layer"]) for a in alerts}
    return [a for a in alerts if (a["kind"], a["layer"]) not in active], now
