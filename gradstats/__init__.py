"""gradstats: batch-norm backward fused with per-channel gradient statistics.

Public API:
    GradStatBatchNorm2d   drop-in nn.BatchNorm2d recording dy/dx statistics on every backward
    convert_batchnorm     replace a model's nn.BatchNorm2d layers by GradStatBatchNorm2d
    plain_state_dict      a state_dict without gradstats buffers, for plain nn.BatchNorm2d models
    GradStats, ChannelStats  the records: per-channel count, mean and variance
    bn_backward_stats     the fused operator (torch.ops.gradstats.bn_backward_stats)
"""

from .nn import GradStatBatchNorm2d, convert_batchnorm, plain_state_dict
from .ops import bn_backward_stats, cpu_capability, cuda_kernels_built
from .stats import ChannelStats, GradStats

__all__ = [
    "ChannelStats",
    "GradStatBatchNorm2d",
    "GradStats",
    "bn_backward_stats",
    "convert_batchnorm",
    "cpu_capability",
    "cuda_kernels_built",
    "plain_state_dict",
]

__version__ = "0.1.0"
