"""gradstats: batch-norm backward fused with per-channel gradient statistics.

Public API:
    GradStatBatchNorm2d   drop-in nn.BatchNorm2d recording dy/dx statistics on every backward
    GradStatSyncBatchNorm2d  the same over a process group's global batch (nn.SyncBatchNorm)
    convert_sync_batchnorm   replace BN layers by GradStatSyncBatchNorm2d
    GradProbe             identity recording the statistics of the gradient through it
    convert_batchnorm     replace a model's nn.BatchNorm2d layers by GradStatBatchNorm2d
    instrument            convert_batchnorm + probes at the outputs of residual blocks
    probes, batchnorms    the recording modules of a model, in order
    first_nonfinite       where NaN/Inf gradients first appeared in the last backward
    metrics               every recording module's statistics as {name: float}, for any logger
    plain_state_dict      a state_dict without gradstats buffers, for plain nn.BatchNorm2d models
    GradStats, ChannelStats  the records: per-channel count, mean and variance
    bn_backward_stats     the fused operator (torch.ops.gradstats.bn_backward_stats)
"""

from . import nn  # noqa: F401, I001  (transitional, see nn.py; not public API)
from .convert import batchnorms, convert_batchnorm, instrument, plain_state_dict, probes
from .records import metrics
from .modules import GradProbe, GradStatBatchNorm2d
from .nonfinite import first_nonfinite
from .ops import bn_backward_stats, channel_moments, cpu_capability, cuda_kernels_built
from .stats import ChannelStats, GradStats
from .syncbn import GradStatSyncBatchNorm2d, convert_sync_batchnorm

__all__ = [
    "ChannelStats",
    "GradProbe",
    "GradStatBatchNorm2d",
    "GradStatSyncBatchNorm2d",
    "GradStats",
    "batchnorms",
    "bn_backward_stats",
    "channel_moments",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "cpu_capability",
    "cuda_kernels_built",
    "first_nonfinite",
    "instrument",
    "metrics",
    "plain_state_dict",
    "probes",
]

__version__ = "0.1.0"
