"""Process-group launch for `gradstats train` under torchrun: where this process stands (rank,
world size, device), the group from torchrun's environment, and the DistributedDataParallel wrap
(plain DDP: the gradient statistics are not buffers, so DDP leaves them alone)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .options import resolve_device


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


def setup(device: str = "auto") -> DistContext:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU,
    nccl on CUDA. An already initialised group is used as it is; no environment, one process."""
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        ctx = DistContext(
            dist.get_rank(), dist.get_world_size(), local_rank, resolve_device(device, local_rank)
        )
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        ctx = DistContext(
            int(os.environ.get("RANK", "0")), world_size, local_rank, resolve_device(device, local_rank)
        )
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
    buffers before every forward; the gradient statistics are not buffers (gradstats.modules),
    so each rank keeps recording its own batches."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
