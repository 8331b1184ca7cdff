"""Typed entry points of the gradstats operators, their fake kernels (shapes and dtypes for
torch.compile / FakeTensor), and the autograd formula of ``bn_backward_stats``.

The operators themselves are defined in C++ (csrc/ops.cpp documents their contracts).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.gradstats)
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    import os as _os

    _package = _os.path.dirname(_os.path.abspath(__file__))
    _hint = (
        "Build it against the installed torch with `pip install --no-build-isolation .` "
        "from the gradstats source folder."
    )
    if _os.path.exists(_os.path.join(_os.path.dirname(_package), "setup.py")):
        # Python found the source folder (the current directory comes first on sys.path), whose
        # gradstats/ holds no compiled library after a plain `pip install .`.
        _hint = (
            f"Python imported gradstats from its source folder {_package}, which holds no "
            "compiled library. Run from another directory to use the installed package, or "
            "build in place: `pip install --no-build-isolation -e .`."
        )
    raise ImportError(
        f"gradstats' compiled extension (gradstats._C) could not be loaded: {error}. {_hint}"
    ) from error

from .reference import bn_backward_formula
from .stats import ROWS

__all__ = [
    "bn_backward_stats",
    "channel_moments",
    "record_grad_stats_",
    "cuda_kernels_built",
    "cpu_capability",
]


def bn_backward_stats(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    grad_input_mask: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch-norm backward fused with per-channel statistics of grad_output and grad_input.

    Returns (grad_input, grad_weight, grad_bias, stats); stats is [2, 4, C] float64, stats[0]
    describing grad_output and stats[1] grad_input, rows (count, mean, M2, nonfinite): the moments
    of the finite values and the number of NaN/infinite ones. The full contract is
    at the schema in csrc/ops.cpp.
    """
    return torch.ops.gradstats.bn_backward_stats.default(
        grad_output, input, weight, mean, invstd, training, grad_input_mask
    )


def record_grad_stats_(state: Tensor, stats: Tensor, ema_decay: float) -> None:
    """Folds ``stats`` ([G, 4, C]) into ``state`` ([3, G, 4, C]: last, accumulated, EMA) in place."""
    torch.ops.gradstats.record_grad_stats_.default(state, stats, ema_decay)


def channel_moments(input: Tensor) -> Tensor:
    """[4, C] float64 (count, mean, M2, nonfinite) per channel of an (N, C, H, W) or (N, C)
    tensor; count, mean and M2 describe its finite values."""
    return torch.ops.gradstats.channel_moments.default(input)


def cuda_kernels_built() -> bool:
    """Whether this build of gradstats contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("gradstats::bn_backward_stats", "CUDA")


def cpu_capability() -> str:
    """The CPU kernel build chosen at run time: baseline, avx2 or avx512."""
    return torch.ops.gradstats.cpu_capability.default()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("gradstats::bn_backward_stats")
def _bn_backward_stats_fake(grad_output, input, weight, mean, invstd, training, grad_input_mask):
    torch._check(input.dim() == 4, lambda: f"input must be 4-D (N, C, H, W), got {input.dim()}-D")
    torch._check(
        grad_output.shape == input.shape,
        lambda: f"grad_output must have input's shape {tuple(input.shape)}, got {tuple(grad_output.shape)}",
    )
    channels = input.shape[1]
    acc = _accumulation_dtype(input.dtype)
    if not grad_input_mask:
        grad_input = input.new_empty(0)
    elif input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last):
        grad_input = torch.empty_like(input)
    else:  # the kernel reads such inputs through one contiguous copy
        grad_input = input.new_empty(input.shape)
    param_dtype = weight.dtype if weight is not None else acc
    grad_weight = input.new_empty(channels, dtype=param_dtype)
    grad_bias = input.new_empty(channels, dtype=param_dtype)
    stats = input.new_empty((2, ROWS, channels), dtype=torch.float64)
    return grad_input, grad_weight, grad_bias, stats


@torch.library.register_fake("gradstats::record_grad_stats_")
def _record_grad_stats_fake(state, stats, ema_decay):
    return None


@torch.library.register_fake("gradstats::channel_moments")
def _channel_moments_fake(input):
    torch._check(input.dim() in (2, 4), lambda: f"input must be 2-D or 4-D, got {input.dim()}-D")
    return input.new_empty((ROWS, input.shape[1]), dtype=torch.float64)


def _moments_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _moments_backward(ctx, grad):
    return None


# Statistics are measurements, not functions to differentiate: the output is marked
# non-differentiable, so autograd treats it as a constant (and opcheck finds a registration).
torch.library.register_autograd(
    "gradstats::channel_moments", _moments_backward, setup_context=_moments_setup_context
)


# -- autograd of bn_backward_stats: the second derivative of batch norm ---------------------------
# The kernel is exact, so its derivative is that of the reference formula; autograd differentiates
# the formula (recomputed from the saved inputs) on demand, for double backward through the op
# itself. (GradStatBatchNorm2d's create_graph=True path recomputes its forward with autograd
# instead, since its saved mean and invstd are not connected to input: see modules.py.) The
# statistics output is not differentiable.

_DIFFERENTIABLE = (0, 1, 2, 3, 4)  # grad_output, input, weight, mean, invstd


def _setup_context(ctx, inputs, output):
    grad_output, input, weight, mean, invstd, training, grad_input_mask = inputs
    ctx.training = training
    ctx.grad_input_mask = grad_input_mask
    ctx.has_weight = weight is not None
    ctx.save_for_backward(grad_output, input, weight, mean, invstd)
    ctx.mark_non_differentiable(output[3])


def _backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias, _grad_stats):
    saved = ctx.saved_tensors
    needed = [i for i in _DIFFERENTIABLE if ctx.needs_input_grad[i] and saved[i] is not None]
    result: list[Tensor | None] = [None] * 7
    if not needed:
        return tuple(result)
    create_graph = torch.is_grad_enabled()  # True only under backward(create_graph=True)
    with torch.enable_grad():
        # Differentiate the formula recomputed from the saved inputs themselves (not detached
        # copies), so that with create_graph the result stays connected for yet another order.
        outputs = bn_backward_formula(*saved, ctx.training)
        pairs = [
            (out, grad.to(out.dtype))
            for out, grad, used in zip(
                outputs,
                (grad_grad_input, grad_grad_weight, grad_grad_bias),
                (ctx.grad_input_mask, True, True),
            )
            if used and grad is not None
        ]
        if not pairs:
            return tuple(result)
        grads = torch.autograd.grad(
            [out for out, _ in pairs],
            [saved[i] for i in needed],
            [grad for _, grad in pairs],
            allow_unused=True,
            create_graph=create_graph,
        )
    for i, grad in zip(needed, grads):
        result[i] = grad
    return tuple(result)


torch.library.register_autograd("gradstats::bn_backward_stats", _backward, setup_context=_setup_context)
