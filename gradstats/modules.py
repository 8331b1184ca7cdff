"""The modules that record gradient statistics: GradStatBatchNorm2d (a drop-in nn.BatchNorm2d
whose backward runs the fused kernel), GradProbe (an identity that measures the gradient through
it), GradStatsRecorder (the statistics buffer and its rules, which both share) and the autograd
function behind GradStatBatchNorm2d."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.gradstats)
from .reference import bn_backward_formula
from .stats import SLOT_ACCUMULATED, SLOT_EMA, SLOT_LAST, ChannelStats, GradStats, new_state

STATE_BUFFER = "grad_stats_state"


def is_state_key(name: str) -> bool:
    """Whether a state_dict key or buffer name is a gradstats statistics buffer."""
    return name == STATE_BUFFER or name.endswith("." + STATE_BUFFER)


# Process-wide order of eager-mode recordings: each recording module notes the next number when
# its backward runs, so first_nonfinite can walk the last backward in the order it executed.
_backward_clock = itertools.count(1)


class _BatchNorm2dWithGradStats(torch.autograd.Function):
    """PyTorch's own batch-norm forward; backward through gradstats::bn_backward_stats, whose
    statistics are folded into the module's state buffer in place (no host synchronisation).

    The state is handed over as a ctx attribute, not saved with save_for_backward: saved tensors
    are version-checked, and the state legitimately changes between forward and backward when a
    graph is backpropagated several times (retain_graph=True) or several graphs are alive.
    """

    @staticmethod
    def forward(
        ctx, input, weight, bias, running_mean, running_var, state, use_batch_stats, momentum, eps, ema_decay
    ):
        output, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            input, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps
        )
        if use_batch_stats:
            mean, invstd = save_mean, save_invstd
        else:
            mean, invstd = running_mean, torch.rsqrt(running_var + eps)
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        ctx.state = state
        ctx.use_batch_stats = use_batch_stats
        ctx.ema_decay = ema_decay
        ctx.eps = eps
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradients must themselves be differentiable
            # functions of input, including through the batch mean and variance, which the
            # fused kernel treats as given. Recompute the forward with autograd for them; the
            # fused op still measures the statistics.
            grads = _differentiable_grads(ctx, grad_output, input, weight, bias, mean, invstd)
            with torch.no_grad():
                stats = torch.ops.gradstats.bn_backward_stats(
                    grad_output, input, weight, mean, invstd, ctx.use_batch_stats, False
                )[3]
        else:
            grad_input, grad_weight, grad_bias, stats = torch.ops.gradstats.bn_backward_stats(
                grad_output, input, weight, mean, invstd, ctx.use_batch_stats, needs[0]
            )
            grads = (
                grad_input if needs[0] else None,
                grad_weight if needs[1] else None,
                grad_bias if needs[2] else None,
            )
        torch.ops.gradstats.record_grad_stats_(ctx.state, stats, ctx.ema_decay)
        return (*grads, None, None, None, None, None, None, None)


def _differentiable_grads(ctx, grad_output, input, weight, bias, mean, invstd):
    """(grad_input, grad_weight, grad_bias) as differentiable tensors, from the forward
    recomputed with autograd (no running-statistics update)."""
    needs = ctx.needs_input_grad[:3]
    inputs = (input, weight, bias)
    with torch.enable_grad():
        if not ctx.use_batch_stats:
            # Running statistics are constants: the reference formula, in differentiable ops, is
            # the whole derivative.
            grads = bn_backward_formula(grad_output, input, weight, mean, invstd, training=False)
            return tuple(g.to(t.dtype) if need else None for g, t, need in zip(grads, inputs, needs))
        # Batch statistics depend on input: differentiate PyTorch's own forward, so that the
        # gradients are differentiable through the batch mean and variance too.
        wanted = [t for t, need in zip(inputs, needs) if need]
        output = torch.ops.aten.native_batch_norm(input, weight, bias, None, None, True, 0.0, ctx.eps)[0]
        found = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in needs)


class GradStatsRecorder:
    """What every recording module shares: the ``grad_stats_state`` buffer (see gradstats.stats),
    the records read from it, and the rules that keep it exact: it stays float64 and contiguous
    whatever ``.half()`` or ``.to(memory_format=...)`` do to the rest of the model, and a
    state_dict without it (a plain model's) loads without touching it."""

    grad_stats_state: Tensor
    # When this module's backward last ran, on _backward_clock; 0 if it never ran eagerly
    # (a compiled graph runs no Python hooks at backward time).
    _backward_seq: int = 0

    def _note_backward(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self._backward_seq = next(_backward_clock)

    @property
    def backward_order(self) -> int:
        """When this module's backward last ran, on a process-wide counter (larger is later);
        0 if it never ran eagerly."""
        return self._backward_seq

    def _watch_backward(self, output: Tensor) -> Tensor:
        """Has the backward node of ``output`` note when it runs (eager mode only; a node
        pre-hook, so nothing is added to the graph or synchronised)."""
        if not torch.compiler.is_compiling() and output.grad_fn is not None:
            output.grad_fn.register_prehook(self._note_backward)
        return output

    def _init_grad_stats(self, num_channels: int, gradients: int, ema_decay: float, device) -> None:
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"grad_stats_ema_decay must be in [0, 1], got {ema_decay}")
        self.grad_stats_ema_decay = float(ema_decay)
        self.register_buffer(STATE_BUFFER, new_state(num_channels, gradients, device=device))

    @property
    def last_grad_stats(self) -> GradStats | None:
        """Statistics of the last backward pass; None before the first."""
        return GradStats.from_slot(self.grad_stats_state[SLOT_LAST])

    @property
    def accumulated_grad_stats(self) -> GradStats | None:
        """Statistics of every backward pass since construction or reset_grad_stats()."""
        return GradStats.from_slot(self.grad_stats_state[SLOT_ACCUMULATED])

    @property
    def ema_grad_stats(self) -> GradStats | None:
        """Exponential moving average: each backward down-weights earlier data by
        grad_stats_ema_decay."""
        return GradStats.from_slot(self.grad_stats_state[SLOT_EMA])

    def reset_grad_stats(self) -> None:
        """Empties the accumulated and moving-average statistics (last_grad_stats is kept)."""
        with torch.no_grad():
            self.grad_stats_state[SLOT_ACCUMULATED:].zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + STATE_BUFFER
        if key not in state_dict:  # e.g. an nn.BatchNorm2d state_dict: keep the statistics
            state_dict = dict(state_dict)
            state_dict[key] = self.grad_stats_state
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):
        # Statistics are float64 counts and sums in a fixed layout: follow device moves only.
        state = self._buffers.pop(STATE_BUFFER)
        try:
            result = super()._apply(fn, recurse)
        finally:
            moved = fn(state)
            if moved.dtype != torch.float64 or not moved.is_contiguous():
                moved = state.to(device=moved.device)
            self._buffers[STATE_BUFFER] = moved
        return result


class GradStatBatchNorm2d(GradStatsRecorder, nn.BatchNorm2d):
    """nn.BatchNorm2d that records per-channel statistics of its gradients.

    Same constructor arguments, forward numerics, parameters and state_dict keys as
    nn.BatchNorm2d, plus one buffer, ``grad_stats_state`` (see gradstats.stats). Every backward
    pass runs the fused gradstats kernel, which also measures mean and variance per channel of
    the gradient arriving at the layer (grad_output, dy) and of the one it sends on (grad_input,
    dx), in the passes over memory the backward makes anyway.

    Read them with ``last_grad_stats`` (the last backward), ``accumulated_grad_stats`` (every
    backward since construction or ``reset_grad_stats()``) and ``ema_grad_stats`` (an exponential
    moving average: each backward down-weights earlier data by ``grad_stats_ema_decay``). Each
    is None until a backward has run. Statistics stay on the module's device in float64; reading
    them synchronises once with the device, recording never does.

    Args beyond nn.BatchNorm2d's:
        grad_stats_ema_decay: weight kept by earlier data at each backward in ema_grad_stats, in
            [0, 1]; 0 makes it the last backward, 1 the accumulated statistics.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        grad_stats_ema_decay: float = 0.9,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_grad_stats(num_features, 2, grad_stats_ema_decay, device)

    # -- forward: nn.BatchNorm2d's, step for step ------------------------------------------
    def _start_forward(self, input: Tensor) -> float:
        """Checks input, counts the batch (training) and returns the running statistics'
        exponential average factor, as nn.BatchNorm2d.forward does."""
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            # aten::native_batch_norm, which the recording path calls, does not check this.
            raise RuntimeError(
                f"{type(self).__name__}({self.num_features}): expected input with "
                f"{self.num_features} channels (dim 1), got shape {tuple(input.shape)}"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, input: Tensor) -> Tensor:
        exponential_average_factor = self._start_forward(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None

        needs_grad = torch.is_grad_enabled() and (
            input.requires_grad
            or (self.weight is not None and self.weight.requires_grad)
            or (self.bias is not None and self.bias.requires_grad)
        )
        if not needs_grad:  # nothing to record: exactly nn.BatchNorm2d
            return F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                use_batch_stats,
                exponential_average_factor,
                self.eps,
            )
        if use_batch_stats:
            # The same check and message as F.batch_norm.
            size = input.size()
            if size[0] * size[2] * size[3] == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {size}"
                )
        return self._watch_backward(
            _BatchNorm2dWithGradStats.apply(
                input,
                self.weight,
                self.bias,
                running_mean,
                running_var,
                self.grad_stats_state,
                use_batch_stats,
                exponential_average_factor,
                self.eps,
                self.grad_stats_ema_decay,
            )
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grad_stats_ema_decay={self.grad_stats_ema_decay}"


class GradProbe(GradStatsRecorder, nn.Module):
    """An identity on (N, C, H, W) or (N, C) tensors that records per-channel statistics of the
    gradient flowing back through it: ``last_grad_stats``, ``accumulated_grad_stats``,
    ``ema_grad_stats`` and ``reset_grad_stats()`` as on GradStatBatchNorm2d (grad_output and
    grad_input are the same record, since the gradient passes unchanged).

    With ``record_activations=True`` it also keeps the per-channel statistics of the last input
    it saw (``last_activation_stats``, a ChannelStats), at the cost of one read of it.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        grad_stats_ema_decay: float = 0.9,
        record_activations: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.record_activations = record_activations
        self._init_grad_stats(num_channels, 1, grad_stats_ema_decay, device)
        self._activation_moments: Tensor | None = None

    @property
    def last_activation_stats(self) -> ChannelStats | None:
        if self._activation_moments is None:
            return None
        return ChannelStats.from_moments(self._activation_moments)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in (2, 4) or input.size(1) != self.num_channels:
            raise ValueError(
                f"GradProbe({self.num_channels}): expected an (N, {self.num_channels}, H, W) or "
                f"(N, {self.num_channels}) tensor, got shape {tuple(input.shape)}"
            )
        if self.record_activations:
            with torch.no_grad():
                self._activation_moments = torch.ops.gradstats.channel_moments(input.detach())
        if torch.is_grad_enabled() and input.requires_grad:
            # A tensor hook, not an autograd.Function returning its input: that output would be
            # a view which the next in-place op (a ReLU(inplace=True)) is not allowed to modify,
            # and a copy would cost a pass over memory. The hook sees the total gradient of the
            # tensor, which is the gradient through the probe.
            if input.is_leaf:
                # A leaf (a model input with requires_grad) outlives the graph, and so would a
                # hook on it: reused over several steps it would collect one hook per forward,
                # each recording every later backward again. Hook a fresh view instead; an
                # in-place op on a leaf that requires grad is refused anyway, on a view or not.
                input = input.view_as(input)
            input.register_hook(self._record)
        return input

    def _record(self, grad: Tensor) -> None:
        self._note_backward()
        stats = torch.ops.gradstats.channel_moments(grad.detach())
        torch.ops.gradstats.record_grad_stats_(
            self.grad_stats_state, stats.unsqueeze(0), self.grad_stats_ema_decay
        )

    def extra_repr(self) -> str:
        return f"{self.num_channels}, grad_stats_ema_decay={self.grad_stats_ema_decay}"
