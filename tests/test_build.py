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


def _f64(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


@pytest.mark.parametrize(
    "case, error, message",
    [
        ((_f64(3, 2, 4, 4), _f64(2, 4, 5), 0.9), ValueError, r"state must have shape \[3, 2, 4, 5\]"),
        ((torch.zeros(3, 2, 4, 4), torch.zeros(2, 4, 4), 0.9), TypeError, "must be float64"),
        ((_f64(3, 2, 4, 4), _f64(2, 4, 4), 1.5), ValueError, r"ema_decay must be in \[0, 1\]"),
        ((_f64(3, 2, 4, 4), _f64(4, 4), 0.9), ValueError, r"stats must have shape \[G, 4, C\]"),
        ((_f64(3, 2, 4, 4), _f64(2, 3, 4), 0.9), ValueError, r"stats must have shape \[G, 4, C\]"),
        ((_f64(3, 2, 4, 4), _f64(1, 4, 4), 0.9), ValueError, r"state must have shape \[3, 1, 4, 4\]"),
    ],
)
def test_record_grad_stats_checks(case, error, message):
    state = case[0].clone()
    with pytest.raises(error, match=message):
        record_grad_stats_(*case)
    assert torch.equal(state, case[0])


_ISA_SCRIPT = r"""
import sys, torch, gradstats
sys.path.insert(0, {tests!r})
from conftest import make_bn_inputs
from test_op import check_against_reference
assert gradstats.cpu_capability() == {isa!r}, gradstats.cpu_capability()
for channels_last in (False, True):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in ((3, 17, 9, 9), (5, 48, 4, 4), (3, 300, 2, 3)):
            for training in (True, False):
                dy, x, w, m, i = make_bn_inputs(shape, dtype, "cpu", channels_last=channels_last, seed=1)
                out = gradstats.bn_backward_stats(dy, x, w, m, i, training, True)
                check_against_reference(out, dy, x, w, m, i, training, True, dtype)
print("ok")
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_build_matches_the_reference(isa, tmp_path):
    """Each instruction-set build of the CPU kernels (chosen with GRADSTATS_CPU_CAPABILITY in a
    fresh process) agrees with the float64 reference."""
    import subprocess
    import sys

    probe = subprocess.run(
        [sys.executable, "-c", "import gradstats; print(gradstats.cpu_capability())"],
        env={**os.environ, "GRADSTATS_CPU_CAPABILITY": isa},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not the source folder: `import gradstats` must find the installed package
    )
    if probe.stdout.strip() != isa:
        pytest.skip(f"this CPU cannot run the {isa} build (it runs {probe.stdout.strip()})")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT.format(tests=tests, isa=isa)],
        env={**os.environ, "GRADSTATS_CPU_CAPABILITY": isa},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
