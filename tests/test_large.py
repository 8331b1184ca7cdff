"""64-bit indexing: a tensor of more than 2**31 elements, opt-in because it needs ~13 GB of
memory and a minute on 2 cores:

    GRADSTATS_RUN_SLOW=1 pytest tests/test_large.py

bfloat16 keeps it at 4.3 GB per tensor (dy, x and dx). The data are built so the exact answers
are known without a float64 reference (which would need 17 GB per tensor): the values past
index 2**31 differ from the rest, so an index computed in 32 bits would read or write the wrong
place and the checks below would see it.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICES

from gradstats.ops import bn_backward_stats, channel_moments

pytestmark = pytest.mark.skipif(
    os.environ.get("GRADSTATS_RUN_SLOW") != "1", reason="needs ~13 GB; set GRADSTATS_RUN_SLOW=1"
)

SHAPE = (1, 1, 2**16, 2**15 + 8)  # 2**31 + 2**19 elements in one channel
NUMEL = SHAPE[2] * SHAPE[3]


def _large_inputs(device):
    # x alternates +1, -1 (so its batch mean is 0 and x_hat = x), dy is 1 except the last 2**19
    # values, which are 2: all of them past index 2**31.
    x = torch.ones(SHAPE, dtype=torch.bfloat16, device=device)
    x.view(-1)[1::2] = -1
    dy = torch.ones(SHAPE, dtype=torch.bfloat16, device=device)
    tail = NUMEL - 2**31
    dy.view(-1)[2**31 :] = 2
    return dy, x, tail


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_2_31_elements(device):
    dy, x, tail = _large_inputs(device)
    m = NUMEL
    mean = torch.zeros(1, device=device)
    invstd = torch.ones(1, device=device)
    grad_input, grad_weight, grad_bias, stats = bn_backward_stats(dy, x, None, mean, invstd, True, True)
    mean_dy = 1 + tail / m
    # x_hat = x: sum(dy * x_hat) = sum over the tail of (2 - 1) * x (the tail has even length
    # and starts at an even index, so its +1 and -1 cancel): 0.
    assert grad_bias.item() == pytest.approx(m + tail, rel=1e-6)
    assert grad_weight.item() == pytest.approx(0.0, abs=1e-3 * m)
    # dx = dy - mean(dy) - x_hat * 0: 1 - mean_dy before index 2**31, 2 - mean_dy after.
    flat = grad_input.view(-1)
    assert flat[0].float().item() == pytest.approx(1 - mean_dy, abs=2e-3 * abs(1 - mean_dy) + 1e-9)
    assert flat[-1].float().item() == pytest.approx(2 - mean_dy, rel=1e-2)
    assert flat[2**31].float().item() == pytest.approx(2 - mean_dy, rel=1e-2)
    assert flat[2**31 - 1].float().item() == pytest.approx(1 - mean_dy, abs=2e-3 * abs(1 - mean_dy) + 1e-9)
    # Statistics of dy: count m, mean 1 + tail/m, variance p(1-p) with p = tail/m.
    p = tail / m
    count, mu, m2, nonfinite = stats[0, :, 0].tolist()
    assert count == m and nonfinite == 0
    assert mu == pytest.approx(1 + p, rel=1e-6)
    assert m2 / count == pytest.approx(p * (1 - p), rel=1e-4)
    moments = channel_moments(dy)
    assert moments[0, 0].item() == m and moments[2, 0].item() / m == pytest.approx(p * (1 - p), rel=1e-4)
