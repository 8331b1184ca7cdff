"""What the build produced, and the record op's own checks."""

import os

import pytest
import torch

import gradstats
from gradstats.ops import record_grad_stats_


def test_cuda_kernels_built_when_required():
    """CI builds with nvcc and sets GRADSTATS_EXPECT_CUDA_BUILD=1: the CUDA kernels must be in."""
    if os.environ.get("GRADSTATS_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("GRADSTATS_EXPECT_CUDA_BUILD is not set")
    assert gradstats.cuda_kernels_built()


def test_cpu_kernel_build_is_reported():
    assert gradstats.cpu_capability() in ("baseline", "avx2", "avx512")


@pytest.mark.parametrize("case, error, message", [
    ((torch.zeros(3, 2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 5, dtype=torch.float64), 0.9), ValueError, r"state must have shape \[3, 2, 3, 5\]"),
    ((torch.zeros(3, 2, 3, 4), torch.zeros(2, 3, 4), 0.9), TypeError, "must be float64"),
    ((torch.zeros(3, 2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64), 1.5), ValueError, r"ema_decay must be in \[0, 1\]"),
    ((torch.zeros(3, 2, 3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64), 0.9), ValueError, r"stats must have shape \[2, 3, C\]"),
])
def test_record_grad_stats_checks(case, error, message):
    state = case[0].clone()
    with pytest.raises(error, match=message):
        record_grad_stats_(*case)
    assert torch.equal(state, case[0])
