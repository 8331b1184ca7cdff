"""gradstats: batch-norm backward fused with per-channel gradient statistics.

Public API:
    GradStatBatchNorm1d/2d/3d  drop-in nn.BatchNorm1d/2d/3d recording dy/dx statistics
    GradStatSyncBatchNorm  the same over a process group's global batch (nn.SyncBatchNorm)
    GradStatSyncBatchNorm2d  an nn.BatchNorm2d doing the same (DDP accepts it on CPU)
    convert_sync_batchnorm   make BatchNorm2d layers GradStatSyncBatchNorm2d, in place
    recording_class       the recording class of any batch-norm class
    GradProbe             identity recording the statistics of the gradient through it
    convert_batchnorm     make every batch-norm layer of a model record, in place
    grad_stats_state_dict, load_grad_stats_state_dict  save / restore the statistics
    all_reduce_grad_stats merge every rank's statistics into those of the global batch
    track_grad_scaler     statistics in loss units under a GradScaler; skipped steps left out
    instrument            convert_batchnorm + probes at the outputs of residual blocks
    probes, batchnorms    the recording modules of a model, in order
    first_nonfinite       where NaN/Inf gradients first appeared in the last backward
    metrics               every recording module's statistics as {name: float}, for any logger
    noise_scale, gsnr, dy_variance_split  gradient noise from per-sample terms (per_sample=True)
    plain_state_dict      a state_dict without gradstats buffers, for plain nn.BatchNorm2d models
    GradStats, ChannelStats  the records: per-channel count, mean and variance
    PerSampleStats        the records over samples of the per-sample parameter-gradient terms
    bn_backward_stats     the fused operator (torch.ops.gradstats.bn_backward_stats)
"""

from .amp import track_grad_scaler
from .convert import (
    batchnorms,
    convert_batchnorm,
    grad_stats_state_dict,
    instrument,
    load_grad_stats_state_dict,
    plain_state_dict,
    probes,
)
from .distributed import all_reduce_grad_stats
from .modules import GradProbe, GradStatBatchNorm1d, GradStatBatchNorm2d, GradStatBatchNorm3d, recording_class
from .noise import dy_variance_split, gsnr, noise_scale
from .nonfinite import first_nonfinite
from .ops import bn_backward_stats, channel_moments, cpu_capability, cuda_kernels_built
from .records import metrics
from .stats import ChannelStats, GradStats, PerSampleStats
from .syncbn import GradStatSyncBatchNorm, GradStatSyncBatchNorm2d, convert_sync_batchnorm

__all__ = [
    "ChannelStats",
    "GradProbe",
    "GradStatBatchNorm1d",
    "GradStatBatchNorm2d",
    "GradStatBatchNorm3d",
    "GradStatSyncBatchNorm",
    "GradStatSyncBatchNorm2d",
    "GradStats",
    "PerSampleStats",
    "all_reduce_grad_stats",
    "batchnorms",
    "bn_backward_stats",
    "channel_moments",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "cpu_capability",
    "cuda_kernels_built",
    "dy_variance_split",
    "first_nonfinite",
    "grad_stats_state_dict",
    "gsnr",
    "instrument",
    "load_grad_stats_state_dict",
    "metrics",
    "noise_scale",
    "plain_state_dict",
    "probes",
    "recording_class",
    "track_grad_scaler",
]

__version__ = "0.1.0"
