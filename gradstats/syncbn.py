"""Batch norm over the global batch of a process group (what nn.SyncBatchNorm computes) that
records dy/dx statistics, on CPU (gloo) as well as CUDA (nccl); nn.SyncBatchNorm itself only
synchronises on GPUs. Two classes share the synchronised forward:
GradStatSyncBatchNorm, the recording class of nn.SyncBatchNorm (see gradstats.modules: what
convert_batchnorm makes of an nn.SyncBatchNorm; (N, C, ...) inputs of 2 to 5 dimensions), and
GradStatSyncBatchNorm2d, an nn.BatchNorm2d (which DistributedDataParallel accepts on CPU, unlike
an nn.SyncBatchNorm), what convert_sync_batchnorm makes of BatchNorm2d layers.

Training with a process group of more than one rank: the forward gathers every rank's
per-channel moments (one all_gather), Chan-merges them into the global mean and variance and
normalises with those; the backward all-reduces sum(dy) and sum(dy * (x - mean)) (one
all_reduce) for the global terms of dx, and returns this rank's weight and bias gradients, as
nn.SyncBatchNorm does (DistributedDataParallel averages them). Statistics of dy and dx are
measured with gradstats.channel_moments: two extra reads, not fused into the backward. Eval mode,
or no process group: nn.SyncBatchNorm's own forward, which falls back to F.batch_norm, recorded
like GradStatBatchNorm2d.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import ops
from .distributed import all_gather_stacked
from .modules import (
    BatchNormRecorder,
    GradStatBatchNorm2d,
    _module_device,
    _register,
    batch_norm_gradients,
    record_batch_norm,
    records_per_sample,
)
from .reference import bn_backward_sums, bn_grad_input, per_sample_sums
from .stats import ROW_COUNT, ROW_M2, ROW_MEAN, ROW_NONFINITE, merge_moments

__all__ = ["GradStatSyncBatchNorm", "GradStatSyncBatchNorm2d", "convert_sync_batchnorm"]


def _channel_shape(input: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (input.dim() - 2)


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
        keeper,
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
        shape = _channel_shape(input)
        output = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            output = output * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(input, weight, mean, invstd, count.to(acc))
        ctx.state, ctx.ema_decay, ctx.group = state, ema_decay, group
        ctx.keeper = keeper
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
        # Per-sample terms given the global batch: this rank's samples, the global mean and invstd.
        terms = per_sample_sums(dy, x, mean, invstd) if records_per_sample(ctx.state) else None
        record_batch_norm(ctx.state, stats, terms, ctx.ema_decay, ctx.keeper)
        grad_weight = grad_bias = None
        if weight is not None:  # this rank's share, as nn.SyncBatchNorm returns it
            grad_weight = sum_dy_xhat.to(weight.dtype)
            grad_bias = sum_dy.to(weight.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


class _GlobalBatchForward:
    """The forward of the synchronised recording classes: in training with a process group of
    more than one rank, _SyncBatchNormWithGradStats (CPU and CUDA); otherwise the class's own
    recorded forward."""

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        world_size = self._world_size() if self.training else 1
        if world_size == 1:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        running = self.track_running_stats and self.running_mean is not None
        return self._watch_backward(
            _SyncBatchNormWithGradStats.apply(
                input,
                self.weight,
                self.bias,
                self.running_mean if running else None,
                self.running_var if running else None,
                self._record_target,
                factor,
                self.eps,
                self.grad_stats_ema_decay,
                self.process_group,
                world_size,
                self if self.grad_stats_per_sample else None,
            )
        )


@_register
class GradStatSyncBatchNorm(_GlobalBatchForward, BatchNormRecorder, nn.SyncBatchNorm):
    """The recording class of nn.SyncBatchNorm (what convert_batchnorm makes of one): every
    argument nn.SyncBatchNorm takes, plus the keyword ``grad_stats_ema_decay``; records as
    GradStatBatchNorm2d. Being an nn.SyncBatchNorm, DistributedDataParallel accepts it on GPU
    modules only, as it does nn.SyncBatchNorm; on CPU (gloo) use GradStatSyncBatchNorm2d."""


class GradStatSyncBatchNorm2d(_GlobalBatchForward, GradStatBatchNorm2d):
    """GradStatBatchNorm2d whose training-mode statistics are those of the global batch across
    ``process_group`` (default: the whole world), like nn.SyncBatchNorm, on CPU (gloo) as well
    as CUDA: an nn.BatchNorm2d, which DistributedDataParallel accepts on CPU too. Same
    parameters, buffers and state_dict keys as nn.BatchNorm2d."""

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
        **kwargs,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group


def convert_sync_batchnorm(
    module: nn.Module, process_group=None, *, grad_stats_ema_decay: float = 0.9, per_sample: bool = False
) -> nn.Module:
    """Makes every nn.BatchNorm2d of ``module`` (exact type, or GradStatBatchNorm2d) a
    GradStatSyncBatchNorm2d in place (``__class__`` swapped: parameters, buffers, hooks and
    statistics kept), and returns ``module``. Subclasses with their own forward are left to
    convert_batchnorm. Run it before gradstats.instrument, which then only adds the probes."""
    for child in module.modules():
        if type(child) not in (nn.BatchNorm2d, GradStatBatchNorm2d):
            continue
        recording = isinstance(child, BatchNormRecorder)
        child.__class__ = GradStatSyncBatchNorm2d
        child.process_group = process_group
        with_terms = per_sample and child.weight is not None  # affine layers only, as convert_batchnorm
        if not recording:
            child._init_grad_stats(
                child.num_features,
                batch_norm_gradients(with_terms),
                grad_stats_ema_decay,
                _module_device(child),
            )
        elif with_terms:
            child.record_per_sample()
    return module
