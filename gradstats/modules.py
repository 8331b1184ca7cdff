"""The modules that record gradient statistics.

How a batch-norm layer records. Recording happens at the level of the batch-norm function, keyed
by module: a recording class is the original class (nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm,
timm's BatchNormAct2d, any subclass whose forward calls ``F.batch_norm``) with one mixin,
BatchNormRecorder, in front. Its forward runs the original class's forward unchanged, inside a
torch-function mode (_RouteBatchNorm) that hands the ``F.batch_norm`` call made with this
module's weight, bias and running statistics to _BatchNormWithGradStats: PyTorch's own forward,
and a backward through the fused gradstats kernel that folds the statistics of dy and dx into the
module's state. Everything else in the forward (activation, dropout, argument checks,
num_batches_tracked, hooks) is the original code, so a new batch-norm subclass needs no new code
here. recording_class(cls) creates that class once per original class (cached);
GradStatBatchNorm1d/2d/3d are the recording classes of torch's, constructible with every
argument torch's constructor takes, plus the keyword ``grad_stats_ema_decay``.
gradstats.convert_batchnorm swaps a module's ``__class__`` to its recording class, so the module
object, its parameters, buffers, hooks and training flag are the user's own.

The mode is traced by torch.compile like the rest of the forward (fullgraph, no graph breaks, no
host synchronisation). Calls the recording path cannot serve are left to ``F.batch_norm`` itself
and record nothing: no gradient required, an empty batch, inputs under a torch.func transform
(vmap, grad, jacrev: functorch-wrapped tensors), arguments F.batch_norm refuses (its error is
the user's error).

The statistics state (see gradstats.stats) is a plain tensor attribute, ``grad_stats_state``,
not a buffer: DistributedDataParallel does not broadcast it (each rank records its own batches)
and ``state_dict()`` has exactly the keys of the original class. ``.to()``/``.cuda()`` move it
(it stays float64 and contiguous whatever dtype or memory format the module takes).
``gradstats.grad_stats_state_dict(model)`` / ``load_grad_stats_state_dict`` save and restore it; a
state_dict from gradstats 0.1 holding a ``grad_stats_state`` key still loads (the key is consumed
and restores the statistics).

GradProbe is an identity that measures the gradient through it, with the same state and records.
"""

from __future__ import annotations

import itertools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from . import ops
from .reference import bn_backward_formula
from .stats import (
    PER_SAMPLE_GRADIENTS,
    ROW_COUNT,
    ROW_MEAN,
    ROWS,
    SAMPLE_GRAD_WEIGHT,
    SLOT_ACCUMULATED,
    SLOT_EMA,
    SLOT_LAST,
    ChannelStats,
    GradStats,
    PerSampleStats,
    new_state,
)

STATE_BUFFER = "grad_stats_state"  # the attribute name, and the state_dict key of gradstats 0.1


def is_state_key(name: str) -> bool:
    """Whether a state_dict key is a gradstats statistics entry (``...grad_stats_state``)."""
    return name == STATE_BUFFER or name.endswith("." + STATE_BUFFER)


# Process-wide order of eager-mode recordings: each recording module notes the next number when
# its backward runs, so first_nonfinite can walk the last backward in the order it executed.
_backward_clock = itertools.count(1)


class _BatchNormWithGradStats(torch.autograd.Function):
    """PyTorch's own batch-norm forward; backward through gradstats::bn_backward_stats, whose
    statistics are folded into the module's state tensor in place (no host synchronisation).

    The state is handed over as a ctx attribute, not saved with save_for_backward: saved tensors
    are version-checked, and the state legitimately changes between forward and backward when a
    graph is backpropagated several times (retain_graph=True) or several graphs are alive.
    """

    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        state,
        use_batch_stats,
        momentum,
        eps,
        ema_decay,
        keeper,
    ):
        output, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            input, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps
        )
        if use_batch_stats:
            mean, invstd = save_mean, save_invstd
        else:
            # As PyTorch: 1/sqrt(var + eps) in the accumulation type, not in a half buffer's.
            acc = ops._accumulation_dtype(input.dtype)
            mean, invstd = running_mean, torch.rsqrt(running_var.to(acc) + eps)
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        ctx.state = state
        ctx.use_batch_stats = use_batch_stats
        ctx.ema_decay = ema_decay
        ctx.eps = eps
        ctx.keeper = keeper
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        per_sample = records_per_sample(ctx.state)
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradients must themselves be differentiable
            # functions of input, including through the batch mean and variance, which the
            # fused kernel treats as given. Recompute the forward with autograd for them; the
            # fused op still measures the statistics.
            grads = _differentiable_grads(ctx, grad_output, input, weight, bias, mean, invstd)
            with torch.no_grad():
                _, _, _, stats, *terms = ops.bn_backward_stats(
                    grad_output, input, weight, mean, invstd, ctx.use_batch_stats, False, per_sample
                )
        else:
            grad_input, grad_weight, grad_bias, stats, *terms = ops.bn_backward_stats(
                grad_output, input, weight, mean, invstd, ctx.use_batch_stats, needs[0], per_sample
            )
            grads = (
                grad_input if needs[0] else None,
                grad_weight if needs[1] else None,
                grad_bias if needs[2] else None,
            )
        record_batch_norm(ctx.state, stats, terms[0] if terms else None, ctx.ema_decay, ctx.keeper)
        return (*grads, None, None, None, None, None, None, None, None)


def records_per_sample(state: Tensor) -> bool:
    """Whether a batch-norm state records per-sample terms (6 gradients, see gradstats.stats)."""
    return state.shape[1] > SAMPLE_GRAD_WEIGHT


def per_sample_moments(terms: Tensor) -> Tensor:
    """[4, rows, C] float64 of the per-sample terms ([2, N, C] as bn_backward_stats returns
    them: bias, weight), in the state's order: statistics over the samples of the weight and
    bias terms, then the batch's mean of each as one value (count 1, M2 0; count 0 when no
    sample was finite)."""
    samples, channels = terms.shape[1], terms.shape[2]
    matrix = torch.stack([terms[1], terms[0]], dim=1).reshape(
        samples, 2 * channels
    )  # [N, (weight, bias) x C], one copy
    over_samples = ops.channel_moments(matrix).reshape(ROWS, 2, channels).transpose(0, 1)
    batch_mean = torch.zeros_like(over_samples)
    batch_mean[:, ROW_COUNT] = (over_samples[:, ROW_COUNT] > 0).to(batch_mean.dtype)
    batch_mean[:, ROW_MEAN] = over_samples[:, ROW_MEAN]
    return torch.cat([over_samples, batch_mean]).contiguous()


def record_batch_norm(state: Tensor, stats: Tensor, terms: Tensor | None, ema_decay: float, keeper) -> None:
    """Folds one backward of a batch-norm layer into ``state``: the dy/dx statistics and, when
    the state records them, the statistics over samples of the per-sample terms. ``keeper`` (the
    module, or None) keeps the terms themselves for last_per_sample_grads (eager mode only:
    a compiled backward cannot hand a tensor to a Python attribute)."""
    if terms is not None:
        stats = torch.cat([stats, per_sample_moments(terms)])
        if keeper is not None and not torch.compiler.is_compiling():
            keeper._last_per_sample_terms = terms.detach()
    torch.ops.gradstats.record_grad_stats_(state, stats, ema_decay)


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
    """What every recording module shares: the ``grad_stats_state`` tensor (see gradstats.stats),
    the records read from it, and the rules that keep it exact: it stays float64 and contiguous
    whatever ``.half()`` or ``.to(memory_format=...)`` do to the rest of the model, follows the
    module's device, and is not part of ``state_dict()`` (see the module docstring)."""

    grad_stats_state: Tensor
    # Where backward passes record: the state itself, or a pending state while a GradScaler is
    # tracked (gradstats.amp commits it at the scaler's update).
    _grad_stats_pending: Tensor | None = None
    # Set by distributed.all_reduce_grad_stats (the state then holds the global batch's
    # statistics), cleared by reset_grad_stats(): a second merge before a reset would count the
    # merged interval once per rank.
    _grad_stats_merged: bool = False
    _grad_stats_skipped: Tensor | None = None
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
        self.grad_stats_state = new_state(num_channels, gradients, device=device)

    @property
    def _record_target(self) -> Tensor:
        """The state tensor backward passes fold their statistics into."""
        pending = self._grad_stats_pending
        return self.grad_stats_state if pending is None else pending

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

    @property
    def grad_stats_skipped_steps(self) -> int:
        """Optimizer steps a tracked GradScaler skipped (inf/NaN gradients) whose statistics
        were left out of the accumulated and moving-average ones (gradstats.track_grad_scaler);
        0 when no scaler is tracked."""
        skipped = self._grad_stats_skipped
        return 0 if skipped is None else int(skipped.item())

    def reset_grad_stats(self) -> None:
        """Empties the accumulated and moving-average statistics (last_grad_stats is kept)."""
        self._grad_stats_merged = False
        with torch.no_grad():
            self.grad_stats_state[SLOT_ACCUMULATED:].zero_()
            if self._grad_stats_pending is not None:
                self._grad_stats_pending.zero_()
            if self._grad_stats_skipped is not None:
                self._grad_stats_skipped.zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # gradstats 0.1 saved the statistics as a buffer: consume that key and restore them.
        saved = state_dict.pop(prefix + STATE_BUFFER, None)
        if saved is not None:
            if saved.shape != self.grad_stats_state.shape:
                error_msgs.append(
                    f"size mismatch for {prefix + STATE_BUFFER}: copying a param with shape "
                    f"{tuple(saved.shape)} from checkpoint, the shape in current model is "
                    f"{tuple(self.grad_stats_state.shape)}."
                )
            else:
                with torch.no_grad():
                    self.grad_stats_state.copy_(saved)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        # Statistics are float64 counts and sums in a fixed layout: follow device moves only.
        for name in (STATE_BUFFER, "_grad_stats_pending", "_grad_stats_skipped"):
            state = self.__dict__.get(name)
            if state is None:
                continue
            moved = fn(state)
            if moved.dtype != torch.float64 or not moved.is_contiguous():
                moved = state.to(device=moved.device)
            self.__dict__[name] = moved
        return result


# -- routing F.batch_norm to the recording function ------------------------------------------------


def _functorch_wrapped(*tensors) -> bool:
    """Whether any tensor is wrapped by a torch.func transform (vmap, grad, jvp, ...)."""
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _batch_norm_arguments(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    return input, running_mean, running_var, weight, bias, training, momentum, eps


class _RouteBatchNorm(TorchFunctionMode):
    """Active during one recording module's forward: its ``F.batch_norm`` call (the first one
    made with the module's weight, bias and running statistics, or None where the module has
    none) runs the recording function; every other call runs unchanged."""

    def __init__(self, module: BatchNormRecorder) -> None:
        super().__init__()
        self.module = module
        self.claimed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and not self.claimed:
            arguments = _batch_norm_arguments(*args, **kwargs)
            if self._is_mine(*arguments):
                self.claimed = True
                return self.module._recording_batch_norm(func, args, kwargs, *arguments)
        return func(*args, **kwargs)

    def _is_mine(self, input, running_mean, running_var, weight, bias, *_) -> bool:
        m = self.module
        return (
            weight is m.weight
            and bias is m.bias
            and (running_mean is None or running_mean is m.running_mean)
            and (running_var is None or running_var is m.running_var)
        )


class BatchNormRecorder(GradStatsRecorder):
    """The mixin that makes a batch-norm class record: see the module docstring. Put in front of
    the original class by recording_class(); not used alone."""

    # The per-sample terms of the last eager backward (per_sample=True), [2, N, C]: bias, weight.
    _last_per_sample_terms: Tensor | None = None

    def __init__(self, *args, grad_stats_ema_decay: float = 0.9, per_sample: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if per_sample:
            self._check_per_sample()
        self._init_grad_stats(
            self.num_features, batch_norm_gradients(per_sample), grad_stats_ema_decay, _module_device(self)
        )

    def _check_per_sample(self) -> None:
        if self.weight is None:
            raise ValueError(
                f"{type(self).__name__}: per_sample=True needs affine=True: the per-sample terms split "
                "grad_weight and grad_bias, which a layer without affine parameters does not have"
            )

    @property
    def grad_stats_per_sample(self) -> bool:
        """Whether this layer also records the per-sample terms of its parameter gradients."""
        return records_per_sample(self.grad_stats_state)

    def record_per_sample(self, enabled: bool = True) -> None:
        """Starts (or stops) recording the per-sample terms of grad_weight and grad_bias. The
        dy/dx statistics recorded so far are kept; per-sample records start empty."""
        if enabled == self.grad_stats_per_sample:
            return
        if enabled:
            self._check_per_sample()
        gradients = batch_norm_gradients(enabled)
        for name in (STATE_BUFFER, "_grad_stats_pending"):
            old = self.__dict__.get(name)
            if old is None:
                continue
            new = new_state(old.shape[-1], gradients, device=old.device)
            new[:, :2] = old[:, :2]
            self.__dict__[name] = new
        if not enabled:
            self._last_per_sample_terms = None

    @property
    def last_per_sample_grads(self) -> tuple[Tensor, Tensor] | None:
        """(grad_weight, grad_bias) split by sample, each [N, C], of the last backward that ran
        eagerly (their sums over N are that backward's grad_weight and grad_bias, in the units
        of the loss it differentiated: scaled under a GradScaler): sample n's terms given the
        batch (see docs/noise.md). None before the first eager backward or without
        per_sample; a compiled backward does not update it (the statistics over samples are
        recorded either way, unscaled under a tracked GradScaler)."""
        terms = self._last_per_sample_terms
        return None if terms is None else (terms[1], terms[0])

    @property
    def last_per_sample_stats(self) -> PerSampleStats | None:
        """Statistics over the samples of the last backward of the per-sample terms."""
        return PerSampleStats.from_slot(self.grad_stats_state[SLOT_LAST])

    @property
    def accumulated_per_sample_stats(self) -> PerSampleStats | None:
        """Statistics over every sample since construction or reset_grad_stats()."""
        return PerSampleStats.from_slot(self.grad_stats_state[SLOT_ACCUMULATED])

    @property
    def ema_per_sample_stats(self) -> PerSampleStats | None:
        """Exponential moving average of the statistics over samples (grad_stats_ema_decay)."""
        return PerSampleStats.from_slot(self.grad_stats_state[SLOT_EMA])

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # inference: nothing to record, no routing to pay for
            return super().forward(*args, **kwargs)
        route = _RouteBatchNorm(self)
        with route:
            output = super().forward(*args, **kwargs)
        if not route.claimed and not torch.compiler.is_compiling():
            _warn_not_recording(type(self))
        return output

    def _recording_batch_norm(
        self, func, args, kwargs, input, running_mean, running_var, weight, bias, training, momentum, eps
    ):
        """F.batch_norm(*args, **kwargs), recording the backward where it can (see the module
        docstring for the calls left to F.batch_norm itself)."""
        needs_grad = torch.is_grad_enabled() and (
            input.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
        channels = input.size(1) if input.dim() >= 2 else -1
        if (
            not needs_grad
            or not 2 <= input.dim() <= 5
            or input.numel() == 0
            or any(t is not None and t.numel() != channels for t in (running_mean, running_var, weight, bias))
            or (weight is not None and not _params_fit(input, weight))
            or _functorch_wrapped(input, weight, bias, running_mean, running_var)
        ):
            return func(*args, **kwargs)
        # F.batch_norm's own checks, with its error types and messages.
        if training:
            size = input.size()
            values = size[0]
            for extent in size[2:]:
                values *= extent
            if values == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {size}"
                )
            if eps <= 0.0:
                raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        elif eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        return self._watch_backward(
            _BatchNormWithGradStats.apply(
                input,
                weight,
                bias,
                running_mean,
                running_var,
                self._record_target,
                training,
                momentum,
                eps,
                self.grad_stats_ema_decay,
                self if self.grad_stats_per_sample else None,
            )
        )

    def __reduce_ex__(self, protocol):
        # A class recording_class created at run time (e.g. for timm's BatchNormAct2d) cannot be
        # found by name: pickle it as "the recording class of <original class>".
        if type(self).__dict__.get("_grad_stats_created", False):
            return (_new_recording_module, (self._grad_stats_original_class,), self.__dict__.copy())
        return super().__reduce_ex__(protocol)


def batch_norm_gradients(per_sample: bool) -> int:
    """Gradients a batch-norm state holds: dy, dx, and with per-sample terms also their
    statistics over samples and over batch means (see gradstats.stats)."""
    return PER_SAMPLE_GRADIENTS if per_sample else 2


_WARNED: set[type] = set()


def _warn_not_recording(cls: type) -> None:
    """Once per class: a converted layer whose forward made no F.batch_norm call with its own
    parameters and running statistics (a custom computation) records nothing."""
    if cls not in _WARNED:
        _WARNED.add(cls)
        original = cls._grad_stats_original_class
        warnings.warn(
            f"gradstats: {original.__module__}.{original.__qualname__}.forward made no F.batch_norm "
            "call with the layer's own weight, bias and running statistics, so this layer records no "
            "gradient statistics (gradstats records the F.batch_norm call of a batch-norm layer)",
            stacklevel=3,
        )


def _params_fit(input: Tensor, weight: Tensor) -> bool:
    """Dtype combinations the native forward accepts as F.batch_norm does: the input's dtype,
    or float32 parameters with a reduced-precision input (autocast)."""
    return weight.dtype == input.dtype or (
        weight.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)
    )


def _module_device(module: nn.Module):
    for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
        return tensor.device
    return None


_RECORDING_CLASSES: dict[type, type] = {}


def recording_class(cls: type) -> type:
    """The recording class of a batch-norm class ``cls`` (created once, cached): ``cls`` with
    BatchNormRecorder in front, named ``GradStat<cls name>``. A recording class is its own."""
    if issubclass(cls, BatchNormRecorder):
        return cls
    found = _RECORDING_CLASSES.get(cls)
    if found is None:
        name = "GradStat" + cls.__name__
        found = type(
            name,
            (BatchNormRecorder, cls),
            {
                "__module__": cls.__module__,
                "__qualname__": name,
                "__doc__": f"{cls.__name__} that records dy/dx statistics (gradstats.recording_class).",
                "_grad_stats_original_class": cls,
                "_grad_stats_created": True,
            },
        )
        _RECORDING_CLASSES[cls] = found
    return found


def _register(cls: type) -> type:
    # The original is the batch-norm class the recording class derives from, past any mixin
    # (GradStatSyncBatchNorm puts its synchronised forward before nn.SyncBatchNorm).
    original = next(
        base
        for base in cls.__mro__[1:]
        if issubclass(base, _BatchNorm) and not issubclass(base, BatchNormRecorder)
    )
    cls._grad_stats_original_class = original
    _RECORDING_CLASSES[original] = cls
    return cls


def _new_recording_module(original: type) -> nn.Module:
    cls = recording_class(original)
    return cls.__new__(cls)


_CLASS_DOC = """{torch_name} that records per-channel statistics of its gradients.

    Constructed with every argument {torch_name} takes (passed on unchanged), plus the keyword
    ``grad_stats_ema_decay``; same forward (PyTorch's own kernel), gradients, running statistics,
    argument checks, repr, state_dict keys and dtype/device behaviour. Every backward runs the
    fused gradstats kernel, which also measures mean and variance per channel of the gradient
    arriving at the layer (grad_output, dy) and of the one it sends on (grad_input, dx).

    Read them with ``last_grad_stats`` (the last backward), ``accumulated_grad_stats`` (every
    backward since construction or ``reset_grad_stats()``) and ``ema_grad_stats`` (an exponential
    moving average: each backward down-weights earlier data by ``grad_stats_ema_decay``, in [0,
    1]). Each is None until a backward has run. Statistics stay on the module's device in
    float64; reading them synchronises once with the device, recording never does.

    With ``per_sample=True`` the kernel also splits grad_weight and grad_bias by sample, in the
    same pass: ``last_per_sample_grads`` gives them ([N, C] each), and ``last_/accumulated_/
    ema_per_sample_stats`` their mean and variance over samples per channel, from which
    gradstats.noise_scale, gradstats.gsnr and gradstats.dy_variance_split are derived.
    """


@_register
class GradStatBatchNorm1d(BatchNormRecorder, nn.BatchNorm1d):
    __doc__ = _CLASS_DOC.format(torch_name="nn.BatchNorm1d")


@_register
class GradStatBatchNorm2d(BatchNormRecorder, nn.BatchNorm2d):
    __doc__ = _CLASS_DOC.format(torch_name="nn.BatchNorm2d")


@_register
class GradStatBatchNorm3d(BatchNormRecorder, nn.BatchNorm3d):
    __doc__ = _CLASS_DOC.format(torch_name="nn.BatchNorm3d")


class GradProbe(GradStatsRecorder, nn.Module):
    """An identity on (N, C, ...) or (N, C) tensors that records per-channel statistics of the
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
        if grad.numel() == 0:
            return  # an empty batch: nothing to record
        stats = torch.ops.gradstats.channel_moments(grad.detach())
        torch.ops.gradstats.record_grad_stats_(
            self._record_target, stats.unsqueeze(0), self.grad_stats_ema_decay
        )

    def extra_repr(self) -> str:
        return f"{self.num_channels}, grad_stats_ema_decay={self.grad_stats_ema_decay}"
