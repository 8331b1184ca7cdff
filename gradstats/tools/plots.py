"""Figures shared by the training plots (logs.py) and the run report (report.py). Drawn on
matplotlib Figure objects (no pyplot state), so callers save them wherever their rules say."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..extras import require


def figure(width: float, height: float) -> Any:
    """A new matplotlib Figure of ``width`` x ``height`` inches (the plot extra names itself)."""
    return require("matplotlib.figure", "the plots").Figure(figsize=(width, height))


def variance_heatmap(
    names: list[str], steps: list[int], values: np.ndarray, title: str, yticks, ylabels, ylabel=None
) -> Any:
    """A Figure with log10 of ``values`` [len(names), len(steps)] (one row per layer or block,
    one column per logged step; non-positive values blank), labelled rows ``ylabels`` at
    ``yticks`` (drawn as written, never parsed as mathtext: names come from run folders)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logvalues = np.log10(np.where(values > 0, values, np.nan))
    rows = len(yticks)
    fig = figure(max(7.5, min(14.0, 0.15 * len(steps) + 5)), max(3.5, 0.2 * rows + 1.8))
    ax = fig.subplots()
    image = ax.imshow(
        logvalues,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(-0.5, len(steps) - 0.5, len(names) - 0.5, -0.5),
    )
    columns = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
    ax.set_xticks(columns, [str(steps[i]) for i in columns])
    ax.set_yticks(yticks, ylabels, fontsize=7, parse_math=False)
    ax.set_xlabel("training step (end of logging interval)")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="log10 variance (mean over channels)")
    fig.tight_layout()
    return fig


def block_variance_curves(
    names: list[str], steps: list[int], values: np.ndarray, columns, xticks, xlabels, title
):
    """A Figure with the per-block variance curve (``values`` [len(names), len(steps)]) at each
    logged step in ``columns``, blocks on the x axis labelled ``xlabels`` at ``xticks`` (drawn
    as written, never parsed as mathtext); a log axis when any value is positive."""
    fig = figure(max(7.0, min(16.0, 0.3 * len(names) + 2)), 4.5)
    ax = fig.subplots()
    for column, style in zip(columns, ("o-", "^:", "s--")):
        ax.plot(range(len(names)), values[:, column], style, ms=3, label=f"step {steps[column]}")
    if (values > 0).any():
        ax.set_yscale("log")
    ax.set_xticks(xticks, xlabels, rotation=60, ha="right", fontsize=7, parse_math=False)
    ax.set_xlabel("residual block (input side -> output side)")
    ax.set_ylabel("gradient variance (mean over channels)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def noise_scale_curves(
    steps: list[int], noise: np.ndarray, loss: np.ndarray, layers: dict[str, np.ndarray], title: str
) -> Any:
    """A Figure of the gradient noise scale B_simple over training (log axis) beside the training
    loss, and B_simple against the loss: whether the noise scale grows as the loss falls
    (McCandlish et al. 2018, section 3). ``noise`` is the model's (all BN parameters), ``layers``
    single layers' (thin lines; layer names drawn as written, never as mathtext). Points where
    B_simple is undefined (NaN: the |G|^2 estimate was not positive) are left out; a panel
    without any stays empty."""
    fig = figure(11.0, 4.2)
    left, right = fig.subplots(1, 2)
    steps_array = np.asarray(steps)
    usable_loss = np.isfinite(loss) & (loss > 0)
    drawn = False
    series = [("model (all BN parameters)", noise, "o-", 2.0)] + [
        (name, values, ".-", 1.0) for name, values in layers.items()
    ]
    for label, values, style, width in series:
        defined = np.isfinite(values) & (values > 0)
        if not defined.any():
            continue
        drawn = True
        left.plot(steps_array[defined], values[defined], style, ms=3, lw=width, label=label)
        both = defined & usable_loss
        right.plot(loss[both], values[both], style, ms=3, lw=width, label=label)
    if drawn:  # a log axis needs a positive value
        left.set_yscale("log")
        right.set_xscale("log")
        right.set_yscale("log")
        left.legend(fontsize=7)
        for text in left.get_legend().get_texts():
            text.set_parse_math(False)
    left.set_xlabel("training step (end of logging interval)")
    left.set_ylabel("B_simple = tr(Sigma) / |G|^2")
    twin = left.twinx()
    twin.plot(steps, loss, "-", color="0.6")
    twin.set_ylabel("training loss (grey)")
    left.set_title("noise scale and loss over training", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    right.invert_xaxis()
    right.set_xlabel("training loss (falling to the right)")
    right.set_ylabel("B_simple")
    right.set_title(title, fontsize=10)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig
