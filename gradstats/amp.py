"""Mixed precision: gradient statistics in the loss's units under a GradScaler.

With ``torch.amp.GradScaler`` the backward runs on the loss times a scale S, so dy and dx carry
S: their means are S times, their variances S^2 times those of the loss's gradients, and S
changes during training; a step the scaler skips (inf/NaN gradients) should not enter the
accumulated or moving-average statistics. ``track_grad_scaler(model, scaler)`` fixes both:

- While tracked, every recording module of ``model`` folds its backward passes into a pending
  state instead of its statistics (the backward is unchanged otherwise).
- ``scaler.update()`` (wrapped on this scaler object) then commits the pending records, all on
  the device, without a host synchronisation: divided by the scale those backward passes used
  (mean / S, M2 / S^2); ``last_grad_stats`` becomes the step's last backward; if the scaler
  skipped the step (its ``step()`` found an inf/NaN gradient: the flags ``update()`` reads), the
  accumulated and moving-average statistics are left as they were and the module's
  ``grad_stats_skipped_steps`` counts it, otherwise the step's backward passes (merged) are
  folded in, one moving-average update per optimizer step.

So under a tracked scaler, the statistics describe the steps up to the last ``update()``.
A model without a tracked scaler records exactly as before, with no extra work. The scale is read
from the scaler's ``_scale`` tensor (the value ``scaler.scale(loss)`` multiplied by), the one
private attribute this relies on; a disabled scaler (``enabled=False``) leaves the model as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .modules import GradStatsRecorder
from .stats import ROW_M2, ROW_MEAN, SLOT_ACCUMULATED, SLOT_EMA, SLOT_LAST

__all__ = ["track_grad_scaler"]

_TRACKED = "_gradstats_tracked_models"


def track_grad_scaler(model: nn.Module, scaler) -> None:
    """Ties ``model``'s gradient statistics to ``scaler`` (a torch.amp.GradScaler): see the
    module docstring. Call it once, after converting the model, before training; calling it
    again for the same model adds nothing."""
    if not hasattr(scaler, "update") or not hasattr(scaler, "is_enabled"):
        raise TypeError(
            f"track_grad_scaler: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}"
        )
    if not scaler.is_enabled():
        return
    recorders = [m for m in model.modules() if isinstance(m, GradStatsRecorder)]
    for m in recorders:
        if m._grad_stats_pending is None:
            m._grad_stats_pending = torch.zeros_like(m.grad_stats_state)
            m._grad_stats_skipped = m.grad_stats_state.new_zeros(())
    tracked = scaler.__dict__.get(_TRACKED)
    if tracked is None:
        tracked = scaler.__dict__[_TRACKED] = []
        _wrap_update(scaler, tracked)
    known = {id(m) for m in tracked}
    tracked.extend(m for m in recorders if id(m) not in known)


def _wrap_update(scaler, tracked: list[GradStatsRecorder]) -> None:
    update = scaler.update

    def update_and_commit(new_scale=None):
        scale = getattr(scaler, "_scale", None)
        used = None if scale is None else scale.detach().clone()
        # scaler.step() skipped the optimizer step iff it found an inf/NaN in some gradient:
        # the found_inf flags update() reads (device tensors), taken before update() clears them.
        found = (
            [
                f.to(device=scale.device)
                for state in getattr(scaler, "_per_optimizer_states", {}).values()
                for f in state.get("found_inf_per_device", {}).values()
            ]
            if scale is not None
            else []
        )
        update(new_scale)
        if used is None:  # no scale(loss) yet: nothing was recorded under a scale
            return
        if found:
            kept = torch.stack(found).sum() == 0
        else:  # no step() since the last update: fall back to the scale (it backs off on a skip)
            kept = scaler._scale >= used
        for m in tracked:
            _commit(m, used, kept)

    scaler.update = update_and_commit


def _unscaled(moments: Tensor, inverse: Tensor) -> Tensor:
    """Statistics [..., rows, C] of the values times ``inverse`` (a 1-element tensor)."""
    out = moments.clone()
    out[..., ROW_MEAN, :] *= inverse
    out[..., ROW_M2, :] *= inverse * inverse
    return out


@torch.no_grad()
def _commit(m: GradStatsRecorder, scale: Tensor, kept: Tensor) -> None:
    """Folds m's pending records (taken at ``scale``) into its statistics if ``kept``, else
    counts a skipped step; empties the pending state. Device tensors only."""
    pending, state = m._grad_stats_pending, m.grad_stats_state
    inverse = scale.to(device=state.device, dtype=torch.float64).reciprocal().reshape(())
    kept = kept.to(state.device).reshape(())
    step = _unscaled(pending[SLOT_ACCUMULATED], inverse)  # every backward of the step, merged
    last = _unscaled(pending[SLOT_LAST], inverse)
    recorded = (step[:, 0].sum() + step[:, 3].sum()) > 0  # any backward since the last commit
    before = state[SLOT_LAST:].clone()
    # record_grad_stats_ folds a step into the accumulated slot (a no-op for a zeroed step) and
    # the moving average (which would decay even then): the moving average of a skipped step is
    # restored below, and the last slot set to the step's last backward.
    torch.ops.gradstats.record_grad_stats_(state, step * kept, m.grad_stats_ema_decay)
    state[SLOT_EMA].copy_(torch.where(kept & recorded, state[SLOT_EMA], before[SLOT_EMA]))
    state[SLOT_LAST].copy_(torch.where(recorded, last, before[SLOT_LAST]))
    m._grad_stats_skipped.add_((recorded & ~kept).to(torch.float64))
    pending.zero_()
