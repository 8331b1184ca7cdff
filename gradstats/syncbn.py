"""GradStatSyncBatchNorm2d: batch norm over the global batch of a process group (what
nn.SyncBatchNorm computes) that records dy/dx statistics like GradStatBatchNorm2d, on CPU (gloo)
as well as CUDA (nccl); nn.SyncBatchNorm itself only runs on GPUs.

Training with a process group of more than one rank: the forward gathers every rank's
per-channel moments (one all_gather), Chan-merges them into the global mean and variance and
normalises with those; the backward all-reduces sum(dy) and sum(dy * (x - mean)) (one
all_reduce) for the global terms of dx, and returns this rank's weight and bias gradients, as
nn.SyncBatchNorm does (DistributedDataParallel averages them). Statistics of dy and dx are
measured with gradstats.channel_moments: two extra reads, not fused into the backward. Eval mode,
or no process group: exactly GradStatBatchNorm2d (as nn.SyncBatchNorm falls back to BatchNorm).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import ops
from .convert import converted_layer
from .distributed import all_gather_stacked
from .modules import GradStatBatchNorm2d
from .reference import bn_backward_sums, bn_grad_input
from .stats import ROW_COUNT, ROW_M2, ROW_MEAN, ROW_NONFINITE, merge_moments

__all__ = ["GradStatSyncBatchNorm2d", "convert_sync_batchnorm"]


class _SyncBatchNormWithGradStats(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        state,
        momentum,
        eps,
        ema_decay,
        group,
        world_size,
    ):
        local = ops.channel_moments(input.detach())  # [rows, C] float64: this rank's moments
        gathered = all_gather_stacked(local, world_size, group)
        total = merge_moments(list(gathered.unbind(0)))
        # channel_moments describes finite values only; a batch statistic over a channel holding
        # NaN or an infinity is NaN, as nn.SyncBatchNorm's is (the output of that channel too).
        poisoned = total[ROW_NONFINITE] > 0
        count = total[ROW_COUNT] + total[ROW_NONFINITE]
        mean = total[ROW_MEAN].masked_fill(poisoned, float("nan"))
        m2 = total[ROW_M2].masked_fill(poisoned, float("nan"))
        var = m2 / count
        if running_mean is not None:  # nn.SyncBatchNorm's update: unbiased global variance
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = m2 / (count - 1).clamp_min(1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        acc = ops._accumulation_dtype(input.dtype)
        mean = mean.to(acc)
        invstd = torch.rsqrt(var + eps).to(acc)
        shape = (1, -1, 1, 1)
        output = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            output = output * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(input, weight, mean, invstd, count.to(acc))
        ctx.state, ctx.ema_decay, ctx.group = state, ema_decay, group
        return output.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, invstd, count = ctx.saved_tensors
        acc = mean.dtype
        dy, x = grad_output.to(acc), input.to(acc)
        # The reference's two phases with the global batch's sums in between: sum(dy) and
        # sum(dy * x_hat) of every rank, one all_reduce, over the global count per channel.
        sum_dy, sum_dy_xhat = bn_backward_sums(dy, x, mean, invstd)
        total = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(total, group=ctx.group)
        acc_weight = None if weight is None else weight.to(acc)
        grad_input = bn_grad_input(dy, x, acc_weight, mean, invstd, total.chunk(2), count)
        grad_input = grad_input.to(input.dtype)
        stats = torch.stack([ops.channel_moments(grad_output), ops.channel_moments(grad_input)])
        ops.record_grad_stats_(ctx.state, stats, ctx.ema_decay)
        grad_weight = grad_bias = None
        if weight is not None:  # this rank's share, as nn.SyncBatchNorm returns it
            grad_weight = sum_dy_xhat.to(weight.dtype)
            grad_bias = sum_dy.to(weight.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


class GradStatSyncBatchNorm2d(GradStatBatchNorm2d):
    """GradStatBatchNorm2d whose training-mode statistics are those of the global batch across
    ``process_group`` (default: the whole world), like nn.SyncBatchNorm. Same parameters,
    buffers and state_dict keys as GradStatBatchNorm2d."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        grad_stats_ema_decay: float = 0.9,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            grad_stats_ema_decay=grad_stats_ema_decay,
        )
        self.process_group = process_group

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        world_size = self._world_size() if self.training else 1
        if world_size == 1:
            return super().forward(input)
        factor = self._start_forward(input)  # training here: world_size > 1 only in training
        running = self.track_running_stats and self.running_mean is not None
        return self._watch_backward(
            _SyncBatchNormWithGradStats.apply(
                input,
                self.weight,
                self.bias,
                self.running_mean if running else None,
                self.running_var if running else None,
                self.grad_stats_state,
                factor,
                self.eps,
                self.grad_stats_ema_decay,
                self.process_group,
                world_size,
            )
        )


def convert_sync_batchnorm(
    module: nn.Module, process_group=None, *, grad_stats_ema_decay: float = 0.9
) -> nn.Module:
    """Replaces every nn.BatchNorm2d and GradStatBatchNorm2d (exact types) in ``module`` by a
    GradStatSyncBatchNorm2d sharing its parameters and buffers (statistics included); returns
    the module. Run it before gradstats.instrument, which then only adds the block probes."""
    if type(module) in (nn.BatchNorm2d, GradStatBatchNorm2d):
        return converted_layer(
            module,
            getattr(module, "grad_stats_ema_decay", grad_stats_ema_decay),
            GradStatSyncBatchNorm2d,
            process_group=process_group,
        )
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group, grad_stats_ema_decay=grad_stats_ema_decay)
        if converted is not child:
            setattr(module, name, converted)
    return module
