"""One training run of `gradstats train` (the command line is train.py): SGD on an
instrumented ResNet that records per-BN-layer and per-block gradient statistics every K steps,
evaluates each epoch, checkpoints, resumes exactly, and runs under torchrun with
DistributedDataParallel (docs/train.md).

Data comes from a source (sources.py: in-memory tensors, or an ImageFolder streamed by a
DataLoader). Reproducibility: a step's global batch comes from sampling.BatchSampler (a function
of (seed, step)) and its augmentation from (seed, step), drawn for the global batch, of which
rank r takes the r-th slice; so it depends neither on the number of processes (or DataLoader
workers) nor on where a run was resumed. The checkpoint holds everything else that changes
(tools/checkpoint.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..alerts import AlertThresholds, check_model, started
from ..amp import track_grad_scaler
from ..convert import batchnorms, grad_stats_state_dict, instrument, load_grad_stats_state_dict, probes
from ..extras import MissingExtra, require
from ..models import VARIANTS, cifar_resnet_variant
from ..records import layer_name, model_noise_scale, summarize_slots
from ..syncbn import convert_sync_batchnorm
from . import launch, logs
from .checkpoint import save_checkpoint
from .options import check_choice, check_min, check_range
from .safe_files import replace_in
from .sources import BatchPlan, open_source
from .writers import TensorBoardWriter, WandbWriter, channel_log10_variances

CHECKPOINT = "checkpoint.pt"
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MIN_IMAGE_SIZE = 8  # a ResNet halves the resolution three times (cifar_resnet) or five
# torchvision models keep their ImageNet stem (7x7 stride-2 convolution, max-pool) for images
# larger than this; smaller ones get the CIFAR stem, which keeps the input's resolution.
CIFAR_STEM_MAX_SIZE = 64


@dataclass
class TrainConfig:
    out: str = "runs/train"
    data: str = "builtin"
    model: str = "cifar_resnet"
    depth: int = 20
    width: float = 1.0
    preact: bool = False
    variant: str = "bn_skip"
    epochs: int = 10
    steps: int = 0  # total steps (the schedule's length); 0: epochs x steps per epoch
    batch_size: int = 128  # global: split over the processes
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # "step": fractions of the run
    gamma: float = 0.1
    augment: bool = False
    image_size: int = 0  # ImageFolder data: 0 is 224 for torchvision models, 32 for cifar_resnet
    # DataLoader worker processes for ImageFolder data (not part of the run: batches do not depend on it)
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    sync_bn: bool = False
    amp: bool = False  # autocast (bfloat16 on CPU; float16 with a GradScaler on CUDA)
    dtype: str = "float32"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0: run to the end
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    wandb: str = ""  # a Weights & Biases project: log there too
    alert_thresholds: dict[str, float] = field(default_factory=dict)  # gradstats.alerts.AlertThresholds
    eval_batch_size: int = 500
    per_sample: bool = False  # record per-sample BN parameter-gradient terms: noise scale, GSNR

    def validate(self) -> None:
        check_choice(self, "model", ("cifar_resnet", *TORCHVISION_MODELS))
        check_choice(self, "variant", VARIANTS)
        check_choice(self, "schedule", ("cosine", "step"))
        check_choice(self, "dtype", DTYPES)
        if self.amp and self.dtype != "float32":
            raise ValueError(
                f"--amp runs a float32 model under autocast: it needs --dtype float32, got {self.dtype}"
            )
        check_min(self, ("epochs", "batch_size", "log_every", "eval_batch_size"), 1)
        check_range(self, "width", 0, math.inf)
        check_range(self, "momentum", -1e-300, 1)  # [0, 1): at or above 1 SGD diverges
        check_range(self, "lr", -1e-300, math.inf)
        check_min(
            self, ("steps", "checkpoint_every", "stop_at", "lr", "momentum", "weight_decay", "gamma"), 0
        )
        check_range(self, "milestones", 0, 1)
        if self.schedule == "step" and not self.milestones:
            raise ValueError("--milestones: the step schedule needs at least one fraction, got none")
        check_min(self, ("workers",), 0)
        if self.image_size:
            check_min(self, ("image_size",), MIN_IMAGE_SIZE)

        self.thresholds()

    def default_image_size(self) -> int:
        """--image-size when not given: torchvision's 224 for its models, 32 for cifar_resnet."""
        return 224 if self.model in TORCHVISION_MODELS else 32

    def thresholds(self) -> AlertThresholds:
        """The alert thresholds: AlertThresholds' defaults, with --alert-thresholds' values."""
        known = AlertThresholds.__dataclass_fields__
        unknown = [k for k in self.alert_thresholds if k not in known]
        if unknown:
            raise ValueError(
                f"--alert-thresholds: unknown {', '.join(unknown)}; choose from {', '.join(known)}"
            )
        try:
            return AlertThresholds(**self.alert_thresholds)
        except ValueError as error:
            raise ValueError(f"--alert-thresholds: {error}") from error


def build_model(config: TrainConfig, num_classes: int, image_size: int = 32) -> nn.Module:
    """The instrumented model: every BN layer records dy/dx statistics, every residual block's
    output a probe. A torchvision model gets the CIFAR stem for images of at most
    CIFAR_STEM_MAX_SIZE pixels a side. --sync-bn converts the BN layers to GradStatSyncBatchNorm2d first."""
    if config.model == "cifar_resnet":
        model = cifar_resnet_variant(
            config.variant, config.depth, num_classes=num_classes, width=config.width, preact=config.preact
        )
    else:
        try:
            import torchvision
        except Exception as error:  # a torchvision built for another torch raises RuntimeError
            raise ValueError(
                f"--model {config.model} needs torchvision, which does not import here "
                f"({type(error).__name__}: {error})"
            ) from error
        model = getattr(torchvision.models, config.model)(num_classes=num_classes)
        if image_size <= CIFAR_STEM_MAX_SIZE:
            # The usual CIFAR stem: small inputs keep their resolution into the first stage.
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
    if config.sync_bn:
        convert_sync_batchnorm(model, per_sample=config.per_sample)
    return instrument(model, per_sample=config.per_sample)


def build_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Per-step learning-rate schedule over the whole run: cosine to 0, or steps of --gamma at
    the --milestones fractions."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    milestones = sorted({max(1, round(f * total_steps)) for f in config.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=config.gamma)


class Trainer:
    """One run: data, model, optimizer and schedule, the step loop, logging, evaluation and
    checkpoints. Only rank 0 writes files or prints."""

    def __init__(
        self, config: TrainConfig, ctx: launch.DistContext, resume: dict | None = None, log=print
    ) -> None:
        self.config, self.ctx = config, ctx
        self.log = log if ctx.is_main else (lambda *a, **k: None)
        self.device, self.dtype = ctx.device, DTYPES[config.dtype]
        self.global_batch = config.batch_size
        if self.global_batch % ctx.world_size:
            raise ValueError(
                f"--batch-size {self.global_batch} (the global batch) must be divisible by "
                f"the number of processes, {ctx.world_size}"
            )
        self.local_batch = self.global_batch // ctx.world_size
        plan = BatchPlan(self.global_batch, ctx.rank, ctx.world_size, config.seed, config.augment)
        self.data = open_source(
            config.data,
            plan,
            image_size=config.image_size or config.default_image_size(),
            image_size_given=bool(config.image_size),
            workers=config.workers,
            device=self.device,
            dtype=self.dtype,
        )
        self.data_description = self.data.description
        self.steps_per_epoch = self.data.sampler.steps_per_epoch
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch

        torch.manual_seed(config.seed)
        self.model = build_model(config, self.data.num_classes, self.data.image_size).to(
            self.device, self.dtype
        )
        bns = batchnorms(self.model)
        self.n_bn = len(bns)
        self.recorders = bns + [(name.removesuffix(".grad_probe"), m) for name, m in probes(self.model)]
        self.recorder_modules = [m for _, m in self.recorders]
        # --amp: autocast to bfloat16 on CPU, float16 on CUDA; float16 gradients need a GradScaler,
        # to which the statistics are tied (loss units; skipped steps left out).
        self.autocast_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = None
        if config.amp and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
            track_grad_scaler(self.model, self.scaler)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.schedule = build_schedule(self.optimizer, config, self.total_steps)
        # Loss sum, correct predictions and samples since the last record, kept on the device.
        self.window = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.step = 0
        self.history: dict[str, Any] = {"eval": [], "elapsed_s": 0.0}
        self.resumed = resume is not None
        if resume is not None:
            self._restore(resume)
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate of the last step taken
        # Alerts raised so far (each once, when it started) and the (kind, layer) pairs raised by
        # the last record; a checkpoint keeps both.
        self.history.setdefault("alerts", [])
        self.history.setdefault("active_alerts", [])
        self.thresholds = config.thresholds()
        self.net = launch.wrap_ddp(self.model, ctx)

        # Wall-clock accounting: elapsed_s adds this process's time since `started` to the
        # resumed run's; images_per_s counts from `mark` (the last record) minus `paused`
        # (evaluation and checkpoint writing).
        self.elapsed_before = self.history["elapsed_s"]
        self.started = self.mark = time.perf_counter()
        self.paused = 0.0

        # Output: rank 0 writes OUT/stats.jsonl (cut back to the resumed step) and the progress
        # bar; the other ranks log nowhere.
        self.stats_path = os.path.join(config.out, logs.STATS_FILE)
        if ctx.is_main:
            try:
                os.makedirs(config.out, exist_ok=True)
            except OSError as error:
                raise ValueError(
                    f"--out {config.out!r}: not a folder gradstats can create ({error})"
                ) from error
            if resume is None:  # a new empty file (a link planted at the name is replaced)
                replace_in(config.out, logs.STATS_FILE, lambda f: None)
            else:
                logs.truncate_records(self.stats_path, self.step)
        self.stats = logs.StatsLog(config.out, self.writers()) if ctx.is_main else _NoLog()
        tqdm = require("tqdm", "gradstats train's progress bar").tqdm
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (ctx.is_main and config.progress),
            dynamic_ncols=True,
        )

    def close(self) -> None:
        """Closes the progress bar, the statistics log and the data source (its workers)."""
        self.bar.close()
        self.stats.close()
        self.data.close()

    # -- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else []
        return {
            "format": "gradstats-train",
            "step": self.step,
            "config": asdict(self.config),
            "world_size": self.ctx.world_size,
            "model": self.model.state_dict(),
            "grad_stats": grad_stats_state_dict(self.model),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "window": self.window.cpu(),
            "history": self.history,
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
        }

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])  # a 0.1 checkpoint's statistics come with it
            if "grad_stats" in state:
                load_grad_stats_state_dict(self.model, state["grad_stats"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(
                f"--resume: the checkpoint does not fit this model and optimizer ({error})"
            ) from error
        self.window.copy_(state["window"])
        self.step = int(state["step"])
        self.history = state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        for index, rng in enumerate(state["rng"]["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, index)
        if not self.ctx.is_main:  # rank 0's state holds every rank's statistics (consolidate)
            for _, m in self.recorders:
                m.reset_grad_stats()
            self.window.zero_()
        saved_world = int(state["world_size"])
        distributed.resume_units(self.recorder_modules, saved_world, self.ctx.world_size)
        if saved_world != self.ctx.world_size and not self.config.sync_bn:
            self.log(
                f"note: the checkpoint was written by {saved_world} process(es), this run has "
                f"{self.ctx.world_size}: each BatchNorm layer now normalises over "
                f"{self.local_batch} samples instead of {self.global_batch // saved_world} "
                f"(--sync-bn normalises over the global batch whatever the number)"
            )

    def checkpoint(self) -> None:
        distributed.consolidate(self.recorder_modules, self.window)
        if self.ctx.is_main:
            started = time.perf_counter()
            self.history["elapsed_s"] = self.elapsed()
            save_checkpoint(self._state(), os.path.join(self.config.out, CHECKPOINT))
            self.paused += time.perf_counter() - started

    def writers(self) -> list:
        """TensorBoard (when installed and not --no-tensorboard) and --wandb writers. A resumed
        run purges TensorBoard events after its checkpoint's step (a crashed run may have written
        some) and continues its Weights & Biases run."""
        writers: list = []
        if self.config.tensorboard:
            try:
                writers.append(TensorBoardWriter(self.config.out, self.step + 1 if self.resumed else None))
            except MissingExtra as error:
                self.log(f"note: no TensorBoard events: {error} (--no-tensorboard silences this)")
        if self.config.wandb:
            writer = WandbWriter(
                self.config.out, self.config.wandb, asdict(self.config), self.history.get("wandb_id")
            )
            self.history["wandb_id"] = writer.run_id
            writers.append(writer)
        return writers

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    # -- steps -------------------------------------------------------------------------------------
    def train_step(self, step: int) -> None:
        images, labels = self.data.train_batch(step)
        with torch.autocast(self.device.type, self.autocast_dtype, enabled=self.config.amp):
            logits = self.net(images)
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.schedule.step()
        with torch.no_grad():  # on the device: no host synchronisation
            self.window[0] += loss.detach() * len(labels)
            self.window[1] += (logits.argmax(1) == labels).sum()
            self.window[2] += len(labels)

    def record(self) -> dict[str, Any] | None:
        """Merged statistics of the interval since the last record (all ranks, one collective),
        then reset; rank 0 writes the record and returns it."""
        merged, totals = distributed.gather_stats(self.recorder_modules, self.window)
        for _, m in self.recorders:
            m.reset_grad_stats()
        self.window.zero_()
        if not self.ctx.is_main:
            return None
        loss_sum, correct, samples = totals.tolist()
        now = time.perf_counter()
        seconds = max(now - self.mark - self.paused, 1e-9)
        self.mark, self.paused = now, 0.0
        names = [layer_name(name) for name, _ in self.recorders]
        bn_slots = list(zip(names[: self.n_bn], merged[: self.n_bn]))
        block_slots = list(zip(names[self.n_bn :], merged[self.n_bn :]))
        bn_layers, blocks = summarize_slots(bn_slots, block_slots)
        record = {
            "step": self.step,
            "epoch": (self.step - 1) // self.steps_per_epoch,
            "lr": self.lr,
            "train_loss": loss_sum / samples if samples else None,
            "train_acc": correct / samples if samples else None,
            "samples": int(samples),
            "images_per_s": samples / seconds,
            "elapsed_s": self.elapsed(),
            "bn_layers": bn_layers,
            "blocks": blocks,
        }
        if self.config.per_sample:
            record["noise_scale"] = model_noise_scale(bn_layers)
        record["alerts"] = self.alerts(record)
        histograms = channel_log10_variances(bn_slots, block_slots) if self.stats.writers else None
        self.stats.write(record, histograms)
        self.bar.update(self.step - self.bar.n)
        self.bar.set_postfix(
            loss=f"{record['train_loss']:.4f}",
            acc=f"{record['train_acc']:.3f}",
            img_s=f"{record['images_per_s']:.0f}",
            refresh=True,
        )
        return record

    def alerts(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The record's health alerts (gradstats.alerts); those that start here are printed and
        kept in the history (summary.json)."""
        alerts = check_model(record, self.model, self.thresholds)  # this rank's last backward
        active = {tuple(pair) for pair in self.history["active_alerts"]}
        new, active = started(alerts, active)
        self.history["active_alerts"] = sorted(list(pair) for pair in active)
        for alert in new:
            self.bar.write(f"alert at step {alert['step']}: {alert['message']}")
        self.history["alerts"].extend(new)
        return alerts

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Test loss and accuracy of rank 0's model (the one checkpoints save), in eval mode."""
        started = time.perf_counter()
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        size = self.config.eval_batch_size
        for images, labels in self.data.eval_batches(size):
            logits = self.model(images)
            sums[0] += F.cross_entropy(logits, labels, reduction="sum")
            sums[1] += (logits.argmax(1) == labels).sum()
        self.model.train()
        loss, correct = sums.tolist()
        n = max(self.data.test_size, 1)
        result = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "test_loss": loss / n,
            "test_acc": correct / n,
        }
        self.history["eval"].append(result)
        self.stats.scalar("eval/test_loss", result["test_loss"], self.step)
        self.stats.scalar("eval/test_acc", result["test_acc"], self.step)
        self.bar.write(
            f"step {self.step} (epoch {result['epoch']:.2f}): test loss {result['test_loss']:.4f}, "
            f"accuracy {result['test_acc']:.4f}"
        )
        self.paused += time.perf_counter() - started
        return result

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        """Steps to --stop-at or the end, then (rank 0, at the end) finish(); closes the logs."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict[str, Any] | None:
        config, main = self.config, self.ctx.is_main
        stop = min(config.stop_at or self.total_steps, self.total_steps)
        self.log(f"data: {self.data_description}")
        self.log(
            f"model: {config.model}"
            + (f"-{config.depth} ({config.variant})" if config.model == "cifar_resnet" else "")
            + f", {sum(p.numel() for p in self.model.parameters())} parameters, {self.n_bn} BN layers, "
            f"{len(self.recorders) - self.n_bn} blocks; {self.ctx.world_size} process(es) on {self.device}, "
            f"global batch {self.global_batch}, {self.steps_per_epoch} steps per epoch"
        )
        if self.step >= stop:
            self.log(
                f"nothing to do: the run is at step {self.step} of {self.total_steps} "
                f"(--stop-at {config.stop_at})"
            )
            return None
        self.started = self.mark = time.perf_counter()  # the clock runs from the first step
        for step in range(self.step, stop):
            self.train_step(step)
            self.step = done = step + 1
            end = done == self.total_steps
            if done % config.log_every == 0 or end:
                self.record()
            if main and (done % self.steps_per_epoch == 0 or end):
                self.evaluate()
            every = config.checkpoint_every or self.steps_per_epoch
            if done % every == 0 or end or done == stop:
                self.checkpoint()
        if not main or self.step < self.total_steps:
            if self.step < self.total_steps:
                self.log(f"stopped at step {self.step} of {self.total_steps}; continue with --resume")
            return None
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """OUT/summary.json and the plots, from the whole run's records."""
        records = logs.read_records(self.stats_path)
        try:
            plots = logs.plot_block_variance(records, self.config.out)
            plots += logs.plot_noise_scale(records, self.config.out)
        except MissingExtra as error:
            self.log(f"note: no plots: {error}")
            plots = []
        last_eval = self.history["eval"][-1] if self.history["eval"] else {}
        elapsed = self.elapsed()
        summary = {
            "config": asdict(self.config),
            "data": self.data_description,
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "bn_layers": [name for name, _ in self.recorders[: self.n_bn]],
            "blocks": [name for name, _ in self.recorders[self.n_bn :]],
            "steps": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.step / self.steps_per_epoch,
            "elapsed_s": elapsed,
            "images_per_s": self.step * self.global_batch / elapsed if elapsed > 0 else None,
            "final_train_loss": records[-1]["train_loss"] if records else None,
            "final_train_acc": records[-1]["train_acc"] if records else None,
            "final_test_loss": last_eval.get("test_loss"),
            "final_test_acc": last_eval.get("test_acc"),
            "eval": self.history["eval"],
            "records": len(records),
            "block_grad_var_first": _block_var(records[0]) if records else None,
            "block_grad_var_last": _block_var(records[-1]) if records else None,
            "noise_scale": [[r["step"], r.get("noise_scale")] for r in records if "noise_scale" in r],
            "plots": [os.path.basename(p) for p in plots],
            "alerts": self.history["alerts"],
        }
        path = replace_in(
            self.config.out,
            "summary.json",
            lambda f: json.dump(logs.finite(summary), f, indent=1, allow_nan=False),
        )
        self.log(f"wrote {path}" + "".join(f", {p}" for p in plots))
        return summary


def _block_var(record: dict[str, Any]) -> dict[str, Any]:
    return {"step": record["step"], "grad_var": [b.get("grad_var") for b in record["blocks"]]}


class _NoLog:
    """What ranks other than 0 log to: nothing."""

    writers = ()

    def write(self, record, histograms=None):
        pass

    def scalar(self, tag, value, step):
        pass

    def close(self):
        pass


def train(config: TrainConfig, resume: dict | None = None, log=print) -> dict[str, Any] | None:
    """Runs training in this process (one of torchrun's, or alone); the summary on rank 0 at
    the end of the run, else None."""
    ctx = launch.setup(config.device)
    try:
        return Trainer(config, ctx, resume, log).run()
    finally:
        launch.teardown(ctx)
