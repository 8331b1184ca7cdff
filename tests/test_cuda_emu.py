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
from conftest import CUDA_EMULATED, TOL, accumulation_dtype, assert_close_scaled, make_bn_inputs, seed_for
from test_op import check_against_reference

from gradstats.reference import channel_moments as reference_moments
from gradstats.reference import per_sample_reference

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
        check_against_reference(out[:4], dy, x, w, mean, invstd, training, True, dtype)
        assert out[4].shape == (0,), "no per-sample sums unless asked for"
    stats = emu.channel_moments(dy, num_sms=num_sms)
    assert torch.equal(stats, out[3][0]), "channel_moments and the backward measure dy alike"


# ---- per-sample sums (per_sample=True) ------------------------------------------------------------
def sample_plan(shape, channels_last, num_sms):
    """The launch plan of the pass that forms per-sample sums, as make_plan and make_sample_plan
    in bn_backward_stats_kernel.cu compute it (only to show which mappings PER_SAMPLE_PLANS
    reach): blocks per channel tile, samples per block, blocks per sample, rows per sample group,
    threads per group (G * TX: > 32 adds through shared memory) and the most values a thread
    visits of one sample (> 256: more than one chunk)."""
    n, c, h, w = shape
    hw, m = h * w, n * h * w
    tile = 1
    while channels_last and tile < 32 and tile < c:
        tile *= 2
    rows = 512 // tile
    tiles = -(-c // tile)
    slices = min(max(1, -(-4 * num_sms // tiles)), max(1, m // (rows * 32)), 65535)
    slices = -(-m // -(-m // slices))
    if slices <= n:
        samples, parts, part_len = -(-n // slices), 1, hw
    else:
        parts = min(slices // n, hw)
        samples, part_len = 1, -(-hw // parts)
        parts = -(-hw // part_len)
    min_group = 1
    while not channels_last and min_group < 32 and min_group < part_len:
        min_group *= 2
    groups = 1
    while groups * 2 <= samples and rows // (groups * 2) >= min_group:
        groups *= 2
    group = rows // groups
    return dict(
        samples=samples,
        parts=parts,
        groups=groups,
        group=group,
        width=group * tile,
        chunk=-(-part_len // group),
    )


# (shape, channels_last) for per_sample=True, with the mappings they reach for num_sms = 1 / 2 / 132
# (sample_plan; test_per_sample_plans_reach_every_mapping checks the claims).
PER_SAMPLE_PLANS = [
    # NCHW, 3 samples of 12100 values: the plain plan's two slices would cut sample 1 in two; here
    # 2 + 1 samples per block, groups of 256 threads (shared memory).
    ((3, 2, 110, 110), False),
    ((1, 1, 300, 300), False),  # N = 1: the sample cut into 4 / 5 / 5 parts, staged and added
    ((40, 3, 9, 9), False),  # 40 samples per block: warps of 32 lanes, 16 samples a round, 3 rounds
    ((70, 2, 3, 5), False),  # HW = 15: groups of 16 lanes, two samples per warp
    ((16, 4, 90, 92), False),  # HW = 8280, num_sms = 1: 259 values per lane, two chunks
    ((8, 3, 64, 64), True),  # channels_last, 3 of a 4-lane tile active: 2 / 1 / 1 samples per block
    ((4, 40, 48, 48), True),  # 40 channels in two 32-lane tiles; num_sms = 132: samples in 4 parts
    ((64, 20, 18, 18), True),  # num_sms = 1: 16 samples per block, one per thread row, 324 values each
    ((20, 3, 5, 5), True),  # 4-lane tiles, 20 samples per block: groups of 8 rows (32 threads), 2 rounds
    ((3, 7, 1, 1), True),  # H = W = 1
]
PER_SAMPLE_CASES = [(1, torch.float32), (132, torch.float32)] + [
    (2, d) for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
]
PER_SAMPLE_IDS = ["1-float32", "132-float32", "2-float32", "2-float64", "2-float16", "2-bfloat16"]


def plan_id(plan):
    return "x".join(map(str, plan[0])) + ("_cl" if plan[1] else "")


def test_per_sample_plans_reach_every_mapping():
    plans = [sample_plan(shape, cl, sms) for shape, cl in PER_SAMPLE_PLANS for sms in (1, 2, 132)]
    cl_plans = [sample_plan(shape, cl, sms) for shape, cl in PER_SAMPLE_PLANS for sms in (1, 2, 132) if cl]
    assert any(p["parts"] > 1 for p in plans), "a sample split across blocks"
    assert any(p["width"] > 32 for p in plans), "groups that add through shared memory"
    assert any(p["width"] == 32 and p["group"] == 32 for p in plans), "a warp per sample"
    assert any(1 < p["width"] < 32 for p in plans), "several sample groups per warp"
    assert any(p["group"] == 1 for p in cl_plans), "channels_last: a sample per thread row"
    assert any(1 < p["group"] and p["width"] <= 32 for p in cl_plans), "channels_last: rows added by shuffles"
    assert any(p["chunk"] > 256 for p in plans), "threads that fold more than one chunk of a sample"
    assert any(p["samples"] % p["groups"] for p in plans), "a last round with idle groups"


def check_per_sample(out, dy, x, mean, invstd, dtype):
    """out[4] against the float64 reference: accumulated in the accumulation dtype whatever the
    storage, so within float32's (float64's) tolerance of the sum of |terms| of each sample."""
    acc = accumulation_dtype(dtype)
    per_sample = out[4]
    assert per_sample.shape == (2, dy.shape[0], dy.shape[1]) and per_sample.dtype == acc
    ref = per_sample_reference(dy, x, mean, invstd)
    x_hat = (x.double() - mean.double().reshape(1, -1, 1, 1)) * invstd.double().reshape(1, -1, 1, 1)
    terms = torch.stack([dy.double().abs().sum((2, 3)), (dy.double() * x_hat).abs().sum((2, 3))])
    assert_close_scaled(per_sample, ref, terms, TOL[acc], "per_sample")
    # Summed over the samples they are grad_bias and grad_weight, up to rounding.
    assert_close_scaled(
        per_sample.double().sum(1), torch.stack([out[2], out[1]]), terms.sum(1), TOL[acc], "sum n"
    )


@pytest.mark.parametrize("num_sms, dtype", PER_SAMPLE_CASES, ids=PER_SAMPLE_IDS)
@pytest.mark.parametrize("plan", PER_SAMPLE_PLANS, ids=plan_id)
def test_per_sample_matches_reference(plan, num_sms, dtype):
    """per_sample=True: the fifth output against the float64 reference, the other four as
    without it (the pass that forms it also measures dy, and in eval writes dx), train and eval
    (eval also without grad_input: the pass that does not write dx)."""
    shape, channels_last = plan
    for training, mask in ((True, True), (False, True), (False, False)):
        dy, x, w, mean, invstd = make_bn_inputs(
            shape,
            dtype,
            "cpu",
            channels_last=channels_last,
            seed=seed_for(shape, num_sms, dtype, training, mask),
        )
        out = emu.bn_backward_stats(dy, x, w, mean, invstd, training, mask, True, num_sms=num_sms)
        check_against_reference(out[:4], dy, x, w, mean, invstd, training, mask, dtype)
        check_per_sample(out, dy, x, mean, invstd, dtype)


@pytest.mark.parametrize("num_sms", [1, 132])
@pytest.mark.parametrize("plan", PER_SAMPLE_PLANS, ids=plan_id)
def test_per_sample_is_bitwise_reproducible(plan, num_sms):
    """Two runs on the same float32 inputs give the same bits in every output (no atomics, a
    fixed order of every sum)."""
    shape, channels_last = plan
    for training in (True, False):
        inputs = make_bn_inputs(
            shape, torch.float32, "cpu", channels_last=channels_last, seed=seed_for(shape, 7)
        )
        first, second = (
            emu.bn_backward_stats(*inputs, training, True, True, num_sms=num_sms) for _ in range(2)
        )
        for a, b in zip(first, second):
            assert torch.equal(a, b) and a.stride() == b.stride()


@pytest.mark.parametrize("num_sms", [1, 132])
@pytest.mark.parametrize(
    "plan",
    [((3, 2, 110, 110), False), ((2, 2, 300, 300), False), ((40, 3, 9, 9), False), ((4, 40, 48, 48), True)],
    ids=plan_id,
)
def test_per_sample_nan_stays_in_its_sample(plan, num_sms):
    """A NaN in sample n's dy of channel c makes per_sample[:, n, c] NaN and nothing else: no sum
    of one sample takes values of another, and every other entry is still right."""
    shape, channels_last = plan
    dy, x, w, mean, invstd = make_bn_inputs(shape, torch.float32, "cpu", channels_last=channels_last, seed=3)
    n, c = shape[0] - 1, shape[1] - 1
    dy[n, c, shape[2] // 2, shape[3] - 1] = float("nan")
    for training in (True, False):
        per_sample = emu.bn_backward_stats(dy, x, w, mean, invstd, training, True, True, num_sms=num_sms)[4]
        nan = torch.zeros(per_sample.shape, dtype=torch.bool)
        nan[:, n, c] = True
        assert torch.equal(per_sample.isnan(), nan)
        ref = per_sample_reference(dy, x, mean, invstd)
        assert torch.allclose(
            per_sample[~nan].double(), ref[~nan], rtol=1e-5, atol=1e-5 * ref[~nan].abs().max().item()
        )


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
    _, _, _, both, _ = emu.bn_backward_stats(dy, x, weight, mean, invstd, False, True, num_sms=num_sms)
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
