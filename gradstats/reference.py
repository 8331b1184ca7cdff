"""Pure-PyTorch reference of ``gradstats::bn_backward_stats``, written for reading, not speed.

``bn_backward_formula`` is the batch-norm backward in plain differentiable torch ops, in whatever
dtype it is given; the op's autograd formula (double backward) differentiates it.
``bn_backward_stats_reference`` evaluates it in float64 and adds the per-channel statistics the
fused kernel must reproduce; every test compares the kernels against it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _reduce_dims(like: Tensor) -> tuple[int, ...]:
    """Every dimension but the channel (dim 1) of an (N, C, ...) tensor: N, then L or H, W or D, H, W."""
    return (0, *range(2, like.dim()))


def _per_channel(t: Tensor, like: Tensor) -> Tensor:
    """[C] -> [1, C, 1, ...], to broadcast against the (N, C, ...) tensor ``like``."""
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))


def bn_backward_sums(
    grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor]:
    """The reduction phase: per channel (sum(dy), sum(dy * x_hat)), x_hat = (x - mean) * invstd.
    They are grad_bias and grad_weight, and what the train-mode grad_input needs from the whole
    batch (SyncBatchNorm all-reduces them between the phases)."""
    x_hat = (input - _per_channel(mean, input)) * _per_channel(invstd, input)
    dims = _reduce_dims(input)
    return grad_output.sum(dims), (grad_output * x_hat).sum(dims)


def per_sample_sums(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """[2, N, C]: the reduction phase split by sample, ``[0][n][c] = sum(dy[n, c])`` and
    ``[1][n][c] = sum(dy[n, c] * x_hat[n, c])`` over the spatial positions of sample n. Their sums
    over n are bn_backward_sums: sample n's terms of grad_bias and grad_weight."""
    x_hat = (input - _per_channel(mean, input)) * _per_channel(invstd, input)
    dims = tuple(range(2, input.dim()))
    if not dims:  # (N, C): one value per sample and channel
        return torch.stack([grad_output, grad_output * x_hat])
    return torch.stack([grad_output.sum(dims), (grad_output * x_hat).sum(dims)])


def bn_grad_input(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    sums: tuple[Tensor, Tensor] | None,
    count: Tensor | float = 1.0,
) -> Tensor:
    """The elementwise phase: grad_input from the reduction phase's ``sums`` over ``count``
    values per channel (a number, or a [C] tensor); ``sums=None`` is eval mode, where the
    running statistics are constants.

      train: grad_input = w * invstd * (dy - sum(dy)/m - x_hat * sum(dy * x_hat)/m)
      eval:  grad_input = w * invstd * dy
    """
    dy = grad_output
    invstd = _per_channel(invstd, dy)
    scale = invstd if weight is None else _per_channel(weight, dy) * invstd
    if sums is None:
        # Running statistics are constants: only term 1 remains.
        return scale * dy
    sum_dy, sum_dy_xhat = sums
    x_hat = (input - _per_channel(mean, input)) * invstd
    # term 1: dy             - the path through x_hat alone, as in eval mode
    # term 2: sum(dy) / m    - the path through the batch mean: every x moved the mean
    # term 3: x_hat * sum(dy * x_hat) / m - the path through the batch variance
    term_mean = _per_channel(sum_dy / count, dy)
    term_var = x_hat * _per_channel(sum_dy_xhat / count, dy)
    return scale * (dy - term_mean - term_var)


def bn_backward_formula(
    grad_output: Tensor, input: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, training: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of y = w * (x - mean) * invstd + b, on one process.

    Per channel, with m = N*H*W values and x_hat = (x - mean) * invstd:
      grad_bias   = sum(dy)
      grad_weight = sum(dy * x_hat)
      grad_input  as bn_grad_input (train mode: mean and invstd are this batch's)
    """
    sum_dy, sum_dy_xhat = bn_backward_sums(grad_output, input, mean, invstd)
    m = input.numel() // input.shape[1]
    sums = (sum_dy, sum_dy_xhat) if training else None
    grad_input = bn_grad_input(grad_output, input, weight, mean, invstd, sums, m)
    return grad_input, sum_dy_xhat, sum_dy


def channel_moments(values: Tensor) -> Tensor:
    """[4, C] float64 (count, mean, M2, nonfinite) of each channel of an (N, C, ...) tensor:
    count, mean and M2 of its finite values, and how many are NaN or infinite.

    Two-pass (mean first, then squared deviations from it) in float64, on values shifted by one
    of them (each channel's first finite value), so that the rounding of a large mean does not
    leak into the variance: identical values give exactly 0.
    """
    v = values.double()
    dims = _reduce_dims(v)
    finite = torch.isfinite(v)
    count = finite.sum(dims).double()
    clean = torch.where(finite, v, torch.zeros_like(v))
    # The first finite value of each channel, in (N, H, W) order (0 when there is none).
    flat = clean.transpose(0, 1).reshape(v.shape[1], -1)
    first = finite.transpose(0, 1).reshape(v.shape[1], -1).to(torch.int8).argmax(dim=1)
    shift = flat.gather(1, first[:, None]).squeeze(1)
    shifted = torch.where(finite, v - _per_channel(shift, v), torch.zeros_like(v))
    mean_shifted = shifted.sum(dims) / count.clamp_min(1)
    deviation = torch.where(finite, shifted - _per_channel(mean_shifted, v), torch.zeros_like(v))
    m2 = (deviation**2).sum(dims)
    nonfinite = (~finite).sum(dims).double()
    return torch.stack([count, shift + mean_shifted, m2, nonfinite])


def bn_backward_stats_reference(
    grad_output: Tensor, input: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, training: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float64 (grad_input, grad_weight, grad_bias, stats), stats as the op's: [2, 4, C] with
    stats[0] for grad_output and stats[1] for grad_input, rows (count, mean, M2, nonfinite)."""
    as64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    dy, x = as64(grad_output), as64(input)
    grad_input, grad_weight, grad_bias = bn_backward_formula(
        dy, x, as64(weight), as64(mean), as64(invstd), training
    )
    stats = torch.stack([channel_moments(dy), channel_moments(grad_input)])
    return grad_input, grad_weight, grad_bias, stats


def per_sample_reference(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """float64 [2, N, C] (bias, weight) per-sample terms, as the op returns with per_sample=True."""
    as64 = lambda t: t.detach().double()  # noqa: E731
    return per_sample_sums(as64(grad_output), as64(input), as64(mean), as64(invstd))
