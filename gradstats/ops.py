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
    "as_4d",
    "bn_backward_stats",
    "channel_moments",
    "record_grad_stats_",
    "cuda_kernels_built",
    "cpu_capability",
]


def as_4d(input: Tensor) -> Tensor:
    """An (N, C, ...) tensor of 2 to 5 dimensions as the 4-D (N, C, L, 1) tensor the kernels take
    (L the product of the trailing sizes): a view, without a copy, of contiguous and
    channels_last / channels_last_3d tensors (a copy for other strides, as the kernels would
    make anyway)."""
    if input.dim() == 4:
        return input
    if not 2 <= input.dim() <= 5:
        raise ValueError(
            f"input must be a 2-D to 5-D (N, C, ...) tensor, got {input.dim()}-D "
            f"with shape {tuple(input.shape)}"
        )
    n, c = input.shape[0], input.shape[1]
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        # (N, C, D, H, W) stored as N, D, H, W, C: D*H*W collapses into one stride-C dimension,
        # which as (N, C, L, 1) is channels_last.
        return input.permute(0, 2, 3, 4, 1).reshape(n, -1, 1, c).permute(0, 3, 1, 2)
    return input.reshape(n, c, -1, 1)


def bn_backward_stats(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    grad_input_mask: bool = True,
    per_sample: bool = False,
) -> tuple[Tensor, ...]:
    """Batch-norm backward fused with per-channel statistics of grad_output and grad_input.

    Takes (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs: the operator itself is
    4-D, and other ranks reach it as (N, C, L, 1) views (see as_4d); grad_input has input's
    shape. Returns (grad_input, grad_weight, grad_bias, stats); stats is [2, 4, C] float64,
    stats[0] describing grad_output and stats[1] grad_input, rows (count, mean, M2, nonfinite):
    the moments of the finite values and the number of NaN/infinite ones.

    ``per_sample=True`` appends a fifth tensor, [2, N, C] in the accumulation dtype: grad_bias
    and grad_weight split by sample (``[0][n] = sum(dy[n])``, ``[1][n] = sum(dy[n] * x_hat[n])``
    per channel), formed in the same pass. The full contract is at the schema in csrc/ops.cpp.
    """
    grad_input, grad_weight, grad_bias, stats, per_sample_grads = (
        torch.ops.gradstats.bn_backward_stats.default(
            as_4d(grad_output), as_4d(input), weight, mean, invstd, training, grad_input_mask, per_sample
        )
    )
    if grad_input_mask and input.dim() != 4:
        grad_input = _from_4d(grad_input, input)
    if per_sample:
        return grad_input, grad_weight, grad_bias, stats, per_sample_grads
    return grad_input, grad_weight, grad_bias, stats


def _from_4d(values: Tensor, like: Tensor) -> Tensor:
    """The inverse of as_4d: a (N, C, L, 1) result in the shape (and, for views, layout) of
    ``like``."""
    if like.dim() == 5 and like.is_contiguous(memory_format=torch.channels_last_3d):
        n, c = like.shape[0], like.shape[1]
        spatial = like.shape[2:]
        return values.permute(0, 2, 3, 1).reshape(n, *spatial, c).permute(0, 4, 1, 2, 3)
    return values.reshape(like.shape)


def record_grad_stats_(state: Tensor, stats: Tensor, ema_decay: float) -> None:
    """Folds ``stats`` ([G, 4, C]) into ``state`` ([3, G, 4, C]: last, accumulated, EMA) in place."""
    torch.ops.gradstats.record_grad_stats_.default(state, stats, ema_decay)


def channel_moments(input: Tensor) -> Tensor:
    """[4, C] float64 (count, mean, M2, nonfinite) per channel of an (N, C, ...) tensor of 2 to 5
    dimensions; count, mean and M2 describe its finite values."""
    return torch.ops.gradstats.channel_moments.default(input if input.dim() == 2 else as_4d(input))


def cuda_kernels_built() -> bool:
    """Whether this build of gradstats contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("gradstats::bn_backward_stats", "CUDA")


def cpu_capability() -> str:
    """The CPU kernel build chosen at run time: baseline, avx2 or avx512."""
    return torch.ops.gradstats.cpu_capability.default()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("gradstats::bn_backward_stats")
def _bn_backward_stats_fake(
    grad_output, input, weight, mean, invstd, training, grad_input_mask, per_sample=False
):
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
    samples = (2, input.shape[0], channels) if per_sample else (0,)
    per_sample_grads = input.new_empty(samples, dtype=acc)
    return grad_input, grad_weight, grad_bias, stats, per_sample_grads


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
    grad_output, input, weight, mean, invstd, training, grad_input_mask = inputs[:7]
    ctx.training = training
    ctx.grad_input_mask = grad_input_mask
    ctx.num_inputs = len(inputs)
    ctx.has_weight = weight is not None
    ctx.save_for_backward(grad_output, input, weight, mean, invstd)
    # Statistics and the per-sample split are measurements: not differentiated.
    ctx.mark_non_differentiable(output[3], output[4])


def _backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias, _grad_stats, _grad_per_sample):
    saved = ctx.saved_tensors
    needed = [i for i in _DIFFERENTIABLE if ctx.needs_input_grad[i] and saved[i] is not None]
    result: list[Tensor | None] = [None] * ctx.num_inputs
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


# -- torch.func (vmap) ------------------------------------------------------------------------------
# Batching rules, so that the ops run under torch.func.vmap, e.g. in gradcheck's batched-gradient
# check (a vmap over the backward's grad_output). The computing ops loop over the batch dimension
# (one call per element, results stacked): correct for any in_dims, at the cost of B calls.
# Recording under vmap records nothing: a vmapped backward computes many vector-Jacobian
# products at once (gradcheck, Jacobians, per-sample gradients), none of which is the training
# step's backward, so the module's statistics are left as they are.


def _vmap_loop(op):
    def rule(info, in_dims, *args):
        outputs = []
        for index in range(info.batch_size):
            sliced = [
                arg.select(dim, index) if dim is not None and isinstance(arg, Tensor) else arg
                for arg, dim in zip(args, in_dims)
            ]
            outputs.append(op(*sliced))
        if isinstance(outputs[0], tuple):
            stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
            return stacked, (0,) * len(stacked)
        return torch.stack(outputs), 0

    return rule


def _record_vmap(info, in_dims, state, stats, ema_decay):
    return None, None


torch.library.register_vmap(
    "gradstats::bn_backward_stats", _vmap_loop(torch.ops.gradstats.bn_backward_stats.default)
)
torch.library.register_vmap(
    "gradstats::channel_moments", _vmap_loop(torch.ops.gradstats.channel_moments.default)
)
torch.library.register_vmap("gradstats::record_grad_stats_", _record_vmap)
# autograd.grad(..., is_grads_batched=True), which gradcheck's batched-gradient check uses, runs
# the backward under the older batching mechanism (dispatch key "Batched"): its generic fallback
# loops over the batch for the computing ops, but not for an in-place op; recording is skipped
# there for the same reason.
_batched = torch.library.Library("gradstats", "IMPL")
_batched.impl("record_grad_stats_", lambda state, stats, ema_decay: None, "Batched")
