"""Tracing non-finite gradients: first_nonfinite walks a model's recording modules in the order
their last backward ran and names the first that received or produced NaN/Inf values."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .modules import GradStatsRecorder
from .stats import ROW_NONFINITE, SLOT_LAST


class NonfiniteSite(NamedTuple):
    """Where first_nonfinite found non-finite gradient values."""

    name: str  # the module's name in the model
    module: nn.Module
    gradient: str  # "grad_output": it arrived with them; "grad_input": it produced them
    channels: int  # channels with at least one non-finite value
    values: int  # non-finite values in that gradient

    def __str__(self) -> str:
        verb = "received" if self.gradient == "grad_output" else "passed on"
        return (
            f"{self.name} ({type(self.module).__name__}) {verb} {self.values} non-finite gradient "
            f"values in {self.channels} channels ({self.gradient})"
        )


def first_nonfinite(model: nn.Module) -> NonfiniteSite | None:
    """The recording module (GradStatBatchNorm2d or GradProbe) where non-finite gradient values
    first appeared in the last backward pass, or None if there were none.

    The modules are walked in the order their backward ran: measured in eager mode (each module
    notes when its backward node runs); a model run through torch.compile runs no Python at
    backward time, and there the order is taken as the reverse of the modules' registration
    order (their forward order in the usual models: torchvision's and gradstats' ResNets,
    nn.Sequential). The first module whose last record counts NaN or infinite values in the
    gradient it received (grad_output) or passed on (grad_input) is returned: "grad_input"
    means this layer turned finite gradients into non-finite ones; "grad_output" means they came
    from above it (the loss, or layers gradstats does not record). Reads the device once.
    """
    recorders = [(name, m) for name, m in model.named_modules() if isinstance(m, GradStatsRecorder)]
    if not recorders:
        return None
    recorders.reverse()  # the fallback order
    # [modules, G, C] non-finite counts of the last backward, padded to 2 gradients, one transfer.
    counts = []
    for _, m in recorders:
        last = m.grad_stats_state[SLOT_LAST, :, ROW_NONFINITE]  # [G, C]
        # grad_input is gradient 1 (a probe has only one; per-sample terms follow in 2 and 3).
        counts.append((last[0], last[min(1, last.shape[0] - 1)]))
    flat = torch.stack(
        [torch.stack([a.sum(), (a > 0).sum(), b.sum(), (b > 0).sum()]) for a, b in counts]
    ).cpu()
    found = [
        (name, module, row)
        for (name, module), row in zip(recorders, flat.tolist())
        if row[0] > 0 or row[2] > 0
    ]
    if not found:
        return None
    if all(module.backward_order > 0 for _, module, _ in found):
        found.sort(key=lambda item: item[1].backward_order)  # the order the backward ran
    name, module, (out_values, out_channels, in_values, in_channels) = found[0]
    if out_values > 0:
        return NonfiniteSite(name, module, "grad_output", int(out_channels), int(out_values))
    return NonfiniteSite(name, module, "grad_input", int(in_channels), int(in_values))
