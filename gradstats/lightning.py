"""PyTorch Lightning integration: ``GradStatsCallback`` logs every BatchNorm layer's and residual
block's gradient statistics (gradstats.metrics) through the trainer's loggers, with health
alerts (gradstats.alerts). Needs ``pip install 'gradstats[lightning]'``.

    from gradstats.lightning import GradStatsCallback
    trainer = lightning.Trainer(callbacks=[GradStatsCallback()], log_every_n_steps=50)

What it does:
- ``setup`` (fit) converts the LightningModule's nn.BatchNorm2d layers and probes its residual
  blocks (gradstats.instrument) before the optimizers are built, parameters shared; with
  ``convert=False`` it expects a model already converted (and refuses one without any
  recording module).
- every ``log_every_n_steps`` optimizer steps (the trainer's by default) it merges the
  statistics accumulated since the last record across the ranks of Lightning's DDP strategy (one
  collective, gradstats.distributed.gather_stats, in units of the global mean loss), reads them
  in one device-to-host copy, logs ``metrics()`` names through every logger of the trainer
  (rank 0), then resets them; training steps in between never synchronise with the host.
- under mixed precision with a GradScaler (``precision="16-mixed"`` on CUDA) the gradients it
  records are multiplied by the loss scale: it divides them back, so values are in loss units.
  An interval over which the scaler changed its scale (a skipped step, or growth) mixes scales;
  it is reported in the last one's units with a ``loss_scale`` alert.
- alerts (gradstats.alerts.check) are logged as warnings once when they start and kept in
  ``callback.alerts``; ``gradstats/alerts`` counts the active ones at each record.
- torch.compile'd modules work: recording needs no graph break, and names drop "_orig_mod".
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .alerts import AlertThresholds, check_model, started
from .convert import instrument
from .distributed import gather_stats, scale_moments, world
from .extras import require
from .records import flatten, recorders, summarize_slots

_pl = require("lightning.pytorch", "gradstats.lightning")

log = logging.getLogger(__name__)

__all__ = ["GradStatsCallback"]


class GradStatsCallback(_pl.Callback):
    """Logs gradstats.metrics through the trainer's loggers every ``log_every_n_steps`` steps (the
    Trainer's when None); see the module docstring.

    Args:
        convert: instrument the LightningModule in ``setup`` (BN layers converted, block probes);
            False: it must already hold recording modules.
        probes: with ``convert``, also probe residual blocks (gradstats.instrument).
        per_sample: with ``convert``, also record the per-sample terms of the BN parameter
            gradients, so that the metrics carry the noise scale, GSNR and dy variance split.
        prefix: metric name prefix (gradstats.metrics).
        thresholds: alert thresholds; ``alerts=False`` turns alerts off.
    """

    def __init__(
        self,
        *,
        convert: bool = True,
        probes: bool = True,
        per_sample: bool = False,
        log_every_n_steps: int | None = None,
        prefix: str = "gradstats/",
        thresholds: AlertThresholds | None = None,
        alerts: bool = True,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be at least 1, got {log_every_n_steps}")
        self.convert, self.probes, self.per_sample = convert, probes, per_sample
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.thresholds = thresholds or AlertThresholds()
        self.check_alerts = alerts
        self.alerts: list[dict[str, Any]] = []  # each alert once, when it started
        self._active: set[tuple[str, str]] = set()
        self._last_step = 0
        self._scales: torch.Tensor | None = None  # [first, last, min, max] loss scale of the interval

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.convert:
            instrument(pl_module, probes=self.probes, per_sample=self.per_sample)
        if not any(recorders(pl_module)):
            raise ValueError(
                "GradStatsCallback: the LightningModule has no nn.BatchNorm2d layer or residual block "
                "that gradstats records"
                if self.convert
                else "GradStatsCallback(convert=False): the LightningModule has no gradstats recording "
                "modules; convert it (gradstats.instrument or convert_batchnorm) or pass convert=True"
            )

    # -- per step: only device work ----------------------------------------------------------------
    def on_after_backward(self, trainer, pl_module) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        # The scale this backward used, as a device tensor (get_scale() would read it on the host).
        scale = scaler._scale.detach().reshape(1).to(torch.float64)
        if self._scales is None:
            self._scales = scale.repeat(4)
        else:
            first, _, low, high = self._scales.unbind()
            self._scales = torch.stack(
                [first, scale[0], torch.minimum(low, scale[0]), torch.maximum(high, scale[0])]
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step == self._last_step or step % every:
            return  # not a logging step, or a micro-batch of gradient accumulation already logged
        self._last_step = step
        self.record(trainer, pl_module, step)

    # -- a record ----------------------------------------------------------------------------------
    def record(self, trainer, pl_module, step: int) -> dict[str, float]:
        """Merges, logs and resets the statistics accumulated since the last record; returns the
        metrics (every rank gets them). Every rank must call it."""
        bns, blocks = recorders(pl_module)
        modules = [m for _, m in bns + blocks]
        device = modules[0].grad_stats_state.device
        scales = (
            self._scales if self._scales is not None else torch.zeros(0, dtype=torch.float64, device=device)
        )
        merged, extra = gather_stats(modules, scales.to(device))
        self._scales = None
        for module in modules:
            module.reset_grad_stats()
        notes = []
        if extra.numel():
            _, world_size = world()
            # Every rank's scaler holds the same scale under DDP (it sees the all-reduced gradients).
            first, last, low, high = (extra / world_size).tolist()
            for moments in merged:
                scale_moments(moments, 1.0 / last)
            if low != high:
                notes.append(
                    ("loss_scale", f"the loss scale changed from {first:g} to {last:g} in this interval")
                )
        bn_records, block_records = summarize_slots(
            [(name, m) for (name, _), m in zip(bns, merged[: len(bns)])],
            [(name, m) for (name, _), m in zip(blocks, merged[len(bns) :])],
        )
        flat = flatten(bn_records, block_records, self.prefix)
        if self.check_alerts:
            flat[f"{self.prefix}alerts"] = float(
                self._alerts(pl_module, step, bn_records, block_records, notes)
            )
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=step)
        return flat

    def _alerts(self, pl_module, step, bn_records, block_records, notes) -> int:
        record = {"step": step, "bn_layers": bn_records, "blocks": block_records}
        alerts = check_model(record, pl_module, self.thresholds)
        alerts += [{"kind": kind, "layer": "", "step": step, "message": message} for kind, message in notes]
        new, self._active = started(alerts, self._active)
        rank, _ = world()
        for alert in new:
            self.alerts.append(alert)
            if rank == 0:
                log.warning("gradstats alert at step %d: %s", step, alert["message"])
        return len(alerts)
