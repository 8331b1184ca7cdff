"""gradstats' CUDA kernels (csrc/cuda) compiled for the host and run under the test emulator
(csrc/cuda_emu), on CPU tensors. Built and put on PYTHONPATH by scripts/cuda_emulator.sh.

bn_backward_stats and channel_moments have exactly the contract of torch.ops.gradstats' operators;
num_sms is the multiprocessor count the launch plan sizes its grid for (an H100 has 132).
install_as_cpu_kernels() makes the emulated kernels the CPU implementation of those operators
for this process, so that any test (autograd, opcheck, modules) runs the CUDA source.
"""

from __future__ import annotations

import contextlib

import torch
from _gradstats_cuda_emu import bn_backward_stats as _bn_backward_stats
from _gradstats_cuda_emu import channel_moments as _channel_moments
from _gradstats_cuda_emu import record_grad_stats_ as _record_grad_stats_
from _gradstats_cuda_emu import run_faulty_kernel  # noqa: F401  (the emulator's self-test)

DEFAULT_NUM_SMS = 132
_installed_num_sms = [DEFAULT_NUM_SMS]
_library = None


def bn_backward_stats(
    grad_output,
    input,
    weight,
    mean,
    invstd,
    training,
    grad_input_mask=True,
    per_sample=False,
    *,
    num_sms=DEFAULT_NUM_SMS,
):
    return _bn_backward_stats(
        grad_output, input, weight, mean, invstd, training, grad_input_mask, per_sample, num_sms
    )


def channel_moments(input, *, num_sms=DEFAULT_NUM_SMS):
    return _channel_moments(input, num_sms)


def record_grad_stats_(state, stats, ema_decay):
    _record_grad_stats_(state, stats, ema_decay)


@contextlib.contextmanager
def num_sms(count: int):
    """The multiprocessor count the installed CPU kernels plan for, within the block."""
    before = _installed_num_sms[0]
    _installed_num_sms[0] = count
    try:
        yield
    finally:
        _installed_num_sms[0] = before


def _bn_backward_stats_installed(
    grad_output, input, weight, mean, invstd, training, grad_input_mask, per_sample=False
):
    return _bn_backward_stats(
        grad_output, input, weight, mean, invstd, training, grad_input_mask, per_sample, _installed_num_sms[0]
    )


def install_as_cpu_kernels() -> None:
    """Registers the emulated CUDA kernels as the CPU kernels of torch.ops.gradstats (overriding
    the CPU build's, for this process)."""
    global _library
    if _library is not None:
        return
    import warnings

    import gradstats  # noqa: F401  (defines the operators)

    lib = torch.library.Library("gradstats", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        warnings.filterwarnings("ignore", message=".*Warning only once for all operators.*")
        # The dispatcher leaves out trailing arguments the caller left at their schema default
        # (per_sample), so the kernel takes them with that default.
        lib.impl("bn_backward_stats", _bn_backward_stats_installed, "CPU")
        lib.impl("channel_moments", lambda x: _channel_moments(x, _installed_num_sms[0]), "CPU")
        lib.impl("record_grad_stats_", _record_grad_stats_, "CPU")
    _library = lib
