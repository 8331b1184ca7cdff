"""The CUDA kernels under the emulator (scripts/cuda_emulator.sh), called directly so that each case
picks the multiprocessor count its launch plan is sized for: grids with several blocks per
channel in both layouts, channels that are no power of two, threads that fold more than one
chunk, precision at large offsets, values near float32's largest, and the emulator's own checks.
Run:  scripts/cuda_emulator.sh python -m pytest -q tests/test_cuda_emu.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA_EMULATED, make_bn_inputs, seed_for
from test_op import check_against_reference

from gradstats.reference import channel_moments as reference_moments

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_EMULATED, reason="runs under scripts/cuda_emulator.sh"),
]

if CUDA_EMULATED:
    import gradstats_cuda_emu as emu

# scripts/cuda_emulator.sh with GRADSTATS_EMU_SANITIZE=1: the emulator is built with AddressSanitizer.
SANITIZED = os.environ.get("GRADSTATS_EMU_SANITIZE") == "1"

# (shape, channels_last): how many blocks per channel the plan gives, for num_sms = 1 / 2 / 132
# (NCHW: blocks of 512 threads, >= 32 values per thread; channels_last: TX x (512 / TX) blocks).
PLANS = [
    ((2, 3, 128, 130), False),  # NCHW, 33280 values per channel: 2 / 2 / 2 blocks per channel
    ((1, 1, 300, 300), False),  # one channel: 4 / 5 / 5 blocks
    ((2, 5, 260, 260), False),  # 1 / 2 / 2 blocks; one block: 264 values per thread, two chunks
    ((8, 3, 64, 64), True),  # channels_last, 3 of a 4-lane tile active: 4 / 8 / 8 blocks
    ((4, 40, 48, 48), True),  # 40 channels in two 32-lane tiles: 2 / 4 / 18 blocks
    ((3, 7, 1, 1), True),  # H = W = 1, a 2-D (N, C) matrix
]


# Every dtype on every plan for 2 multiprocessors; float32 (the mutants' cases) for all three counts.
@pytest.mark.parametrize(
    "num_sms, dtype",
    [(1, torch.float32), (132, torch.float32)]
    + [(2, d) for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)],
    ids=["1-float32", "132-float32", "2-float32", "2-float64", "2-float16", "2-bfloat16"],
)
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "x".join(map(str, p[0])) + ("_cl" if p[1] else ""))
def test_grids_of_several_blocks_match_reference(plan, num_sms, dtype):
    shape, channels_last = plan
    for training in (True, False):
        dy, x, w, mean, invstd = make_bn_inputs(
            shape, dtype, "cpu", channels_last=channels_last, seed=seed_for(shape, num_sms, dtype, training)
        )
        out = emu.bn_backward_stats(dy, x, w, mean, invstd, training, True, num_sms=num_sms)
        check_against_reference(out, dy, x, w, mean, invstd, training, True, dtype)
    stats = emu.channel_moments(dy, num_sms=num_sms)
    assert torch.equal(stats, out[3][0]), "channel_moments and the backward measure dy alike"


@pytest.mark.parametrize("num_sms", [1, 132])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_float32_variance_at_offset_of_1e4_std(channels_last, num_sms):
    """Channels whose |mean| is 1e4 standard deviations: float32 variance within 1e-5 relative
    of float64 (threads rounding their means to float and merging in float are ~1e-4 off)."""
    shape = (4, 6, 180, 100)  # 72000 values per channel
    g = torch.Generator().manual_seed(seed_for(channels_last, num_sms))
    offsets = torch.tensor([1e4, -1e4, 3e3, 1e4, -5e3, 1e4], dtype=torch.float64).reshape(1, -1, 1, 1)
    dy = ((torch.randn(shape, generator=g, dtype=torch.float64) + offsets) * 0.01).float()
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    truth = reference_moments(dy)
    for stats in (
        emu.channel_moments(dy, num_sms=num_sms),
        emu.bn_backward_stats(
            dy,
            *make_bn_inputs(shape, torch.float32, "cpu", channels_last=channels_last, seed=1)[1:],
            False,
            True,
            num_sms=num_sms,
        )[3][0],
    ):
        rel = ((stats[2] / stats[0]) - truth[2] / truth[0]).abs() / (truth[2] / truth[0])
        print(f"max relative variance error {rel.max().item():.2e}")
        assert rel.max().item() < 1e-5
        assert torch.equal(stats[0], truth[0]) and torch.equal(stats[3], truth[3])


@pytest.mark.parametrize("magnitude", [1e20, 3e38])
@pytest.mark.parametrize("num_sms", [1, 132])
@pytest.mark.parametrize(
    "plan",
    [((2, 3, 128, 130), False), ((8, 3, 64, 64), True), ((3, 5, 4, 4), False)],
    ids=["nchw_2_blocks", "channels_last", "nchw_few_values"],
)
def test_finite_values_near_float32_max_give_finite_moments(plan, num_sms, magnitude):
    """Finite float32 values up to 3e38: their squares overflow float32, and so do differences
    between them; the moments must still be finite and right (and no merge with an empty side,
    such as a thread with no values, may make a NaN)."""
    shape, channels_last = plan
    g = torch.Generator().manual_seed(seed_for(plan, num_sms, magnitude))
    dy = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * magnitude
    dy[:, 1] = dy[:, 1].abs()  # a channel whose mean is near the magnitude itself
    dy = dy.float()
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    truth = reference_moments(dy)
    _, x, _, mean, invstd = make_bn_inputs(shape, torch.float32, "cpu", channels_last=channels_last, seed=2)
    weight = torch.full((shape[1],), 0.25)  # keeps dx = dy * w * invstd finite (invstd ~ 1/3)
    _, _, _, both = emu.bn_backward_stats(dy, x, weight, mean, invstd, False, True, num_sms=num_sms)
    for which, stats in (("channel_moments", emu.channel_moments(dy, num_sms=num_sms)), ("dy", both[0])):
        print(which, stats)
        assert torch.isfinite(stats).all(), which
        assert torch.equal(stats[0], truth[0]) and torch.equal(stats[3], truth[3]), which
        assert torch.allclose(stats[1], truth[1], rtol=1e-5, atol=1e-5 * magnitude), which
        assert torch.allclose(stats[2], truth[2], rtol=1e-5), which
    assert torch.isfinite(both[1]).all(), "dx statistics"


def test_errors_match_the_operator():
    dy, x, w, mean, invstd = make_bn_inputs((4, 3, 5, 5), torch.float32, "cpu", seed=4)
    with pytest.raises(ValueError, match=r"weight must have shape \[3\]"):
        emu.bn_backward_stats(dy, x, w[:2], mean, invstd, True, True)
    with pytest.raises(TypeError, match="input must be float32"):
        emu.channel_moments(x.long())
    with pytest.raises(ValueError, match="num_sms must be at least 1"):
        emu.channel_moments(x, num_sms=0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("shared_race", "race on shared array 'cells' element 0.*racy_kernel"),
        ("barrier_skipped", "exited while other threads of its block wait at __syncthreads"),
        ("shuffle_exited_lane", "__shfl_down_sync.*names lane 31, which has exited"),
        ("shared_out_of_range", "out of range: shared array 'cells' element 64 of 64"),
    ],
)
def test_emulator_reports_faulty_kernels(case, message):
    """The emulator's own checks, on small faulty kernels (csrc/cuda_emu/faulty_kernels.cpp)."""
    with pytest.raises(RuntimeError, match=message):
        emu.run_faulty_kernel(case)


@pytest.mark.skipif(
    not SANITIZED,
    reason="only AddressSanitizer checks global memory: GRADSTATS_EMU_SANITIZE=1 scripts/cuda_emulator.sh",
)
def test_asan_catches_a_global_read_past_the_end():
    """A kernel that reads one element past a global buffer: ASan aborts the process with a
    heap-buffer-overflow report in that kernel (so it runs in a child process, which inherits
    the emulator's environment: PYTHONPATH, LD_PRELOAD, ASAN_OPTIONS)."""
    code = "import gradstats_cuda_emu as emu; emu.run_faulty_kernel('global_out_of_range')"
    # -P: the child imports the installed gradstats, not the source folder of the current directory
    child = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode != 0, "the out-of-range read went unnoticed"
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in child.stderr, child.stderr[-4000:]
    assert "READ of size 4" in child.stderr, child.stderr[-4000:]
    assert "in global_out_of_range_kernel" in child.stderr, child.stderr[-4000:]
