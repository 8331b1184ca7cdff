"""torch.distributed for training with gradient statistics: process-group setup from torchrun's
environment, DistributedDataParallel that leaves the statistics buffers alone, and the merge of
every rank's accumulated statistics in one collective.

Units. Each rank's loss is the mean over its own B samples, so every gradient a rank records
(dy, dx, block gradients) is world_size times the gradient of the global mean loss over the W*B
samples a single process would see (the backward is linear in the loss). gather_stats merges the
ranks' statistics (Chan merge) and rescales them by 1/world_size: the result is what one process
training on the global batch records (exactly so for GradStatSyncBatchNorm2d models; with
per-rank BatchNorm, each rank normalises its own B samples, as DDP always does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .nn import GradStatsRecorder, gradstats_buffer_names
from .stats import ROW_M2, ROW_MEAN, SLOT_ACCUMULATED, merge_moments
from .syncbn import all_gather_stacked

__all__ = ["DistContext", "setup", "teardown", "wrap_ddp", "gather_stats", "consolidate", "scale_moments"]


@dataclass
class DistContext:
    """Where this process stands: its rank among world_size processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_min(options, names, minimum: int) -> None:
    """ValueError naming the option if any of ``names`` (attributes of ``options``) is below
    ``minimum``."""
    for name in names:
        value = getattr(options, name)
        if value < minimum:
            bound = ">= 0" if minimum == 0 else f"at least {minimum}"
            raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' is CUDA when available, else CPU; a bare 'cuda' becomes this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: not a device ({error})") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: gradstats runs on cpu or cuda[:index]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup(device: str = "auto") -> DistContext:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU,
    nccl on CUDA. An already initialised group is used as it is; no environment, one process."""
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank,
                          resolve_device(device, local_rank))
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        ctx = DistContext(int(os.environ.get("RANK", "0")), world_size, local_rank,
                          resolve_device(device, local_rank))
        if world_size > 1:
            cuda = ctx.device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", device_id=ctx.device if cuda else None)
            ctx.owns_group = True
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    return ctx


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel(model) when distributed, else the model. DDP broadcasts rank 0's
    buffers before every forward (to keep BN running statistics equal), which would overwrite
    every rank's gradient statistics with rank 0's: they are excluded from it."""
    if not ctx.distributed:
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, gradstats_buffer_names(model))
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def scale_moments(moments: Tensor, factor: float) -> Tensor:
    """The statistics [..., rows, C] of the values times ``factor``, in place: mean x factor,
    M2 x factor^2 (counts unchanged). Returns ``moments``."""
    moments[..., ROW_MEAN, :] *= factor
    moments[..., ROW_M2, :] *= factor * factor
    return moments


def _gather(modules: list[GradStatsRecorder], extra: Tensor, ctx: DistContext) -> Tensor:
    """[world_size, L]: every rank's accumulated slots, flattened and concatenated, then its
    ``extra`` values; one collective."""
    parts = [m.grad_stats_state[SLOT_ACCUMULATED].reshape(-1) for m in modules]
    local = torch.cat(parts + [extra.reshape(-1).to(torch.float64)])
    if not ctx.distributed:
        return local.unsqueeze(0)
    return all_gather_stacked(local, ctx.world_size)


def _split(gathered: Tensor, modules: list[GradStatsRecorder]):
    """Per module, its slots from every rank [world_size, G, rows, C]; then the extras."""
    offset = 0
    slots = []
    for m in modules:
        shape = m.grad_stats_state.shape[1:]
        size = shape.numel()
        slots.append(gathered[:, offset:offset + size].reshape(-1, *shape))
        offset += size
    return slots, gathered[:, offset:]


def gather_stats(modules: list[GradStatsRecorder], extra: Tensor, ctx: DistContext,
                 ) -> tuple[list[Tensor], Tensor]:
    """Every rank's accumulated statistics of ``modules``, merged: per module a [G, rows, C]
    float64 CPU tensor, in the units of the global mean loss (see the module docstring); and
    ``extra`` (a small float64 tensor, e.g. loss sums) summed over ranks. One collective and one
    device-to-host copy; every rank must call it, and every rank gets the result."""
    gathered = _gather(modules, extra, ctx).cpu()
    slots, extras = _split(gathered, modules)
    merged = []
    for per_rank in slots:
        if ctx.world_size == 1:
            merged.append(per_rank[0])  # a view of the fresh gathered tensor, not of module state
            continue
        merged.append(scale_moments(merge_moments(list(per_rank.unbind(0))), 1.0 / ctx.world_size))
    return merged, extras.sum(0)


def consolidate(modules: list[GradStatsRecorder], extra: Tensor, ctx: DistContext) -> None:
    """Moves every rank's accumulated statistics and ``extra`` sums into rank 0's (merged, in
    rank units: world_size x the global loss's) and empties the other ranks', so that rank 0's
    state alone (what a checkpoint saves) holds them all. Later merges give the same result,
    since the Chan merge is associative. Every rank must call it; nothing to do in one process.
    A run resumed with another number of processes rescales them (see resume_units)."""
    if not ctx.distributed:
        return
    slots, extras = _split(_gather(modules, extra, ctx), modules)
    with torch.no_grad():
        for m, per_rank in zip(modules, slots):
            accumulated = m.grad_stats_state[SLOT_ACCUMULATED]
            if ctx.is_main:
                accumulated.copy_(merge_moments(list(per_rank.unbind(0))))
            else:
                accumulated.zero_()
        if ctx.is_main:
            extra.copy_(extras.sum(0).to(extra.dtype))
        else:
            extra.zero_()


def resume_units(modules: list[GradStatsRecorder], saved_world_size: int, ctx: DistContext) -> None:
    """Accumulated statistics saved by a run of ``saved_world_size`` processes are in its rank
    units; converts them to this run's (see the module docstring)."""
    if saved_world_size != ctx.world_size:
        with torch.no_grad():
            for m in modules:
                scale_moments(m.grad_stats_state[SLOT_ACCUMULATED], ctx.world_size / saved_world_size)
