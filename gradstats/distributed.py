"""Gradient statistics across the ranks of a process group: every rank's accumulated statistics
merged in one collective (gather_stats), every layer's statistics replaced by the global batch's
on every rank (all_reduce_grad_stats, the public call for users' own DDP loops), moved into rank
0's state (consolidate), and rescaled when a run resumes with another number of processes
(resume_units).

The statistics state is not a buffer, so DistributedDataParallel (default arguments) leaves it
alone: each rank records the gradients of its own local batches until one of these merges it.

Units. Each rank's loss is the mean over its own B samples, so every gradient a rank records
(dy, dx, block gradients) is world_size times the gradient of the global mean loss over the W*B
samples a single process would see (the backward is linear in the loss). gather_stats merges the
ranks' statistics (Chan merge) and rescales them by 1/world_size: the result is what one process
training on the global batch records (exactly so for GradStatSyncBatchNorm2d models; with
per-rank BatchNorm, each rank normalises its own B samples, as DDP always does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .modules import GradStatsRecorder
from .stats import ROW_M2, ROW_MEAN, SLOT_ACCUMULATED, SLOT_LAST, merge_moments

__all__ = [
    "all_gather_stacked",
    "all_reduce_grad_stats",
    "gather_stats",
    "consolidate",
    "resume_units",
    "scale_moments",
    "world",
]


def world(group=None) -> tuple[int, int]:
    """(rank, world_size) of this process in ``group`` (the default group when None); (0, 1)
    when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_stacked(input: Tensor, world_size: int, group=None) -> Tensor:
    """Every rank's ``input`` stacked: [world_size, *input.shape], in one collective."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.14
    output = input.new_empty(world_size * input.numel())  # gloo takes the concatenated form only
    gather(output, input.contiguous().reshape(-1), group=group)
    return output.view(world_size, *input.shape)


def scale_moments(moments: Tensor, factor: float) -> Tensor:
    """The statistics [..., rows, C] of the values times ``factor``, in place: mean x factor,
    M2 x factor^2 (counts unchanged). Returns ``moments``."""
    moments[..., ROW_MEAN, :] *= factor
    moments[..., ROW_M2, :] *= factor * factor
    return moments


def _gather(
    modules: list[GradStatsRecorder],
    extra: Tensor,
    group,
    slots=slice(SLOT_ACCUMULATED, SLOT_ACCUMULATED + 1),
) -> Tensor:
    """[world_size, L]: every rank's ``slots`` of every module's state (the accumulated slot by
    default), flattened and concatenated, then its ``extra`` values; one collective."""
    parts = [m.grad_stats_state[slots].reshape(-1) for m in modules]
    local = torch.cat(parts + [extra.reshape(-1).to(torch.float64)])
    _, world_size = world(group)
    if world_size == 1:
        return local.unsqueeze(0)
    return all_gather_stacked(local, world_size, group)


def _split(
    gathered: Tensor, modules: list[GradStatsRecorder], slots=slice(SLOT_ACCUMULATED, SLOT_ACCUMULATED + 1)
):
    """Per module, its slots from every rank [world_size, *slots shape]; then the extras."""
    offset = 0
    result = []
    for m in modules:
        shape = m.grad_stats_state[slots].shape
        if shape[0] == 1:
            shape = shape[1:]
        size = shape.numel()
        result.append(gathered[:, offset : offset + size].reshape(-1, *shape))
        offset += size
    return result, gathered[:, offset:]


def gather_stats(modules: list[GradStatsRecorder], extra: Tensor, group=None) -> tuple[list[Tensor], Tensor]:
    """Every rank's accumulated statistics of ``modules``, merged: per module a [G, rows, C]
    float64 CPU tensor, in the units of the global mean loss (see the module docstring); and
    ``extra`` (a small float64 tensor, e.g. loss sums) summed over ranks. One collective and one
    device-to-host copy; every rank must call it, and every rank gets the result."""
    gathered = _gather(modules, extra, group).cpu()
    slots, extras = _split(gathered, modules)
    world_size = gathered.shape[0]
    merged = []
    for per_rank in slots:
        if world_size == 1:
            merged.append(per_rank[0])  # a view of the fresh gathered tensor, not of module state
            continue
        merged.append(scale_moments(merge_moments(list(per_rank.unbind(0))), 1.0 / world_size))
    return merged, extras.sum(0)


def consolidate(modules: list[GradStatsRecorder], extra: Tensor, group=None) -> None:
    """Moves every rank's accumulated statistics and ``extra`` sums into rank 0's (merged, in
    rank units: world_size x the global loss's) and empties the other ranks', so that rank 0's
    state alone (what a checkpoint saves) holds them all. Later merges give the same result,
    since the Chan merge is associative. Every rank must call it; nothing to do in one process.
    A run resumed with another number of processes rescales them (see resume_units)."""
    rank, world_size = world(group)
    if world_size == 1:
        return
    slots, extras = _split(_gather(modules, extra, group), modules)
    with torch.no_grad():
        for m, per_rank in zip(modules, slots):
            accumulated = m.grad_stats_state[SLOT_ACCUMULATED]
            if rank == 0:
                accumulated.copy_(merge_moments(list(per_rank.unbind(0))))
            else:
                accumulated.zero_()
        if rank == 0:
            extra.copy_(extras.sum(0).to(extra.dtype))
        else:
            extra.zero_()


def resume_units(modules: list[GradStatsRecorder], saved_world_size: int, world_size: int) -> None:
    """Accumulated statistics saved by a run of ``saved_world_size`` processes are in its rank
    units; converts them to those of a run of ``world_size`` (see the module docstring)."""
    if saved_world_size != world_size:
        with torch.no_grad():
            for m in modules:
                scale_moments(m.grad_stats_state[SLOT_ACCUMULATED], world_size / saved_world_size)


def all_reduce_grad_stats(model: nn.Module, group=None) -> None:
    """Replaces, on every rank, the statistics of every recording module of ``model`` (last,
    accumulated and moving average) by those of the global batch: every rank's merged (Chan
    merge) and expressed in the units of the global mean loss (1/world_size of each rank's: see
    the module docstring). One collective; every rank of ``group`` must call it, e.g. before
    reading or logging the statistics, followed by ``reset_grad_stats()`` on every recording
    module before the next interval is merged (a second merge without a reset would count the
    merged interval once per rank: it raises RuntimeError instead). In one process it changes
    nothing. With per-rank
    BatchNorm each rank normalised its own batch: dy and dx are then the gradients DDP
    computed, which one process on the global batch reproduces exactly for SyncBatchNorm models
    or eval-mode layers."""
    modules = [m for m in model.modules() if isinstance(m, GradStatsRecorder)]
    _, world_size = world(group)
    if world_size == 1 or not modules:
        return
    merged_before = [name for name, m in model.named_modules() if getattr(m, "_grad_stats_merged", False)]
    if merged_before:
        raise RuntimeError(
            f"all_reduce_grad_stats: {merged_before[0]!r} (and {len(merged_before) - 1} more) already hold "
            "the merged statistics of every rank; call reset_grad_stats() on the recording modules "
            "(e.g. after logging) before merging again"
        )
    every = slice(SLOT_LAST, None)
    empty = modules[0].grad_stats_state.new_empty(0)
    per_module, _ = _split(_gather(modules, empty, group, every), modules, every)
    with torch.no_grad():
        for m, per_rank in zip(modules, per_module):
            merged = merge_moments(list(per_rank.unbind(0)))
            m.grad_stats_state.copy_(scale_moments(merged, 1.0 / world_size))
            m._grad_stats_merged = True
