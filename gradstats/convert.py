"""Putting the recording modules into existing models: convert_batchnorm (every batch-norm layer
becomes an instance of its recording class, in place), instrument (conversion plus a GradProbe
at the output of every residual block it recognises), the lists of a model's recording modules,
and saving/restoring their statistics (grad_stats_state_dict / load_grad_stats_state_dict), which
model.state_dict() leaves out."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .modules import (
    STATE_BUFFER,
    BatchNormRecorder,
    GradProbe,
    GradStatsRecorder,
    _module_device,
    batch_norm_gradients,
    is_state_key,
    recording_class,
)


def _convertible(module: nn.Module) -> bool:
    """A batch-norm layer convert_batchnorm gives a recording class: nn.BatchNorm1d/2d/3d,
    nn.SyncBatchNorm and their subclasses (whose forward, to record, calls F.batch_norm), but not
    lazy layers, which replace their own class on their first forward."""
    return isinstance(module, _BatchNorm) and not isinstance(module, nn.modules.lazy.LazyModuleMixin)


def _is_normalization(module: nn.Module) -> bool:
    """A normalization layer convert_batchnorm leaves alone and names: torch's other norms, and
    anything named like a norm holding its own statistics or affine parameters (timm's
    FrozenBatchNorm2d, LayerNorm2d, EvoNorm, ...)."""
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm, _NormBase)):
        return True
    own = set(module._parameters) | set(module._buffers)
    return "Norm" in type(module).__name__ and bool(own & {"weight", "running_mean", "running_var"})


def convert_batchnorm(
    module: nn.Module, *, grad_stats_ema_decay: float = 0.9, per_sample: bool = False, strict: bool = False
) -> nn.Module:
    """Makes every batch-norm layer of ``module`` record gradient statistics; returns ``module``.

    Every nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm and subclass of them
    (timm's BatchNormAct2d, ...) becomes an instance of its recording class (see
    gradstats.modules): the same module object with its ``__class__`` swapped, so its
    parameters, buffers, hooks, training flag and place in the model are unchanged (an optimizer
    built before keeps working). Layers already recording are left alone, so converting twice is
    harmless. A bare batch-norm layer is converted and returned.

    Nothing is skipped silently: normalization layers it does not convert (GroupNorm, LayerNorm,
    InstanceNorm, frozen batch norms such as timm's FrozenBatchNorm2d, lazy batch norms not yet
    initialised, custom norms) are named in one warning; with ``strict=True`` they raise a
    ValueError instead. A converted subclass whose forward does not call F.batch_norm is named
    in a warning the first time it runs without recording.

    ``per_sample=True`` makes every layer with affine parameters also record the per-sample
    terms of its parameter gradients (see GradStatBatchNorm2d), layers already recording
    included; layers without (affine=False) record dy and dx only.
    """
    skipped = []
    for name, child in module.named_modules():
        with_terms = per_sample and getattr(child, "weight", None) is not None  # affine layers only
        if isinstance(child, BatchNormRecorder):
            if with_terms:
                child.record_per_sample()
            continue
        if _convertible(child):
            child.__class__ = recording_class(type(child))
            child._init_grad_stats(
                child.num_features,
                batch_norm_gradients(with_terms),
                grad_stats_ema_decay,
                _module_device(child),
            )
        elif _is_normalization(child):
            skipped.append(f"{name or '(the module itself)'} ({type(child).__name__})")
    if skipped:
        message = (
            f"convert_batchnorm: {len(skipped)} normalization layer(s) do not record gradient "
            f"statistics (not batch-norm layers gradstats can convert): {', '.join(skipped)}"
        )
        if strict:
            raise ValueError(message + "; pass strict=False to convert the rest and go on")
        warnings.warn(message, stacklevel=2)
    return module


def grad_stats_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The statistics of every recording module of ``model`` (batch-norm layers and probes):
    ``{"<module name>.grad_stats_state": tensor}``, the tensors themselves (detached, on their
    device), as state_dict() returns parameters. What model.state_dict() leaves out; save it
    next to it and restore with load_grad_stats_state_dict."""
    return {
        _state_key(name): m.grad_stats_state.detach()
        for name, m in model.named_modules()
        if isinstance(m, GradStatsRecorder)
    }


def load_grad_stats_state_dict(model: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
    """Restores statistics saved by grad_stats_state_dict into ``model``'s recording modules.
    Keys other than ``...grad_stats_state`` are ignored, so a whole gradstats 0.1 model
    state_dict works too. With ``strict``, every recording module must find its entry and every
    entry its module (a KeyError naming them otherwise); a shape mismatch is a ValueError."""
    recorders = {_state_key(name): m for name, m in model.named_modules() if isinstance(m, GradStatsRecorder)}
    saved = {k: v for k, v in state_dict.items() if is_state_key(k)}
    if strict and saved.keys() != recorders.keys():
        missing = sorted(recorders.keys() - saved.keys())
        unexpected = sorted(saved.keys() - recorders.keys())
        raise KeyError(
            f"load_grad_stats_state_dict: statistics missing for {missing}, "
            f"no recording module for {unexpected}"
        )
    with torch.no_grad():
        for key, m in recorders.items():
            if key not in saved:
                continue
            value = saved[key]
            if value.shape != m.grad_stats_state.shape:
                raise ValueError(
                    f"load_grad_stats_state_dict: {key} has shape {tuple(value.shape)}, the "
                    f"module's statistics have shape {tuple(m.grad_stats_state.shape)}"
                )
            m.grad_stats_state.copy_(value)


def _state_key(module_name: str) -> str:
    return f"{module_name}.{STATE_BUFFER}" if module_name else STATE_BUFFER


def plain_state_dict(source: nn.Module | dict[str, Any]) -> dict[str, Any]:
    """A state_dict without gradstats statistics entries. model.state_dict() has none since
    gradstats 0.2; this strips them from state_dicts saved by gradstats 0.1."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    return {k: v for k, v in state.items() if not is_state_key(k)}


# -- instrument: BN layers converted, probes at residual-block outputs ---------------------------

_PROBE = "grad_probe"


# Residual-block classes of torchvision and timm, by module prefix and class name. Their output
# channels are those of their last batch-norm layer (the main branch's, or the shortcut's: equal).
_KNOWN_BLOCKS = {
    "torchvision.models": {
        "BasicBlock",
        "Bottleneck",
        "InvertedResidual",
        "MBConv",
        "FusedMBConv",
        "ResBottleneckBlock",
    },
    "timm.models": {
        "BasicBlock",
        "Bottleneck",
        "InvertedResidual",
        "DepthwiseSeparableConv",
        "EdgeResidual",
        "CondConvResidual",
    },
}


def _residual_block_channels(module: nn.Module) -> int | None:
    """Output channels of a residual block this library knows how to probe, else None:
    gradstats.models blocks, and the residual blocks of torchvision's and timm's ResNets,
    RegNets, MobileNets and EfficientNets."""
    from .models.cifar_resnet import BasicBlock, PreActBlock

    if isinstance(module, (BasicBlock, PreActBlock)):
        return module.out_channels
    cls = type(module)
    known = any(
        cls.__module__.startswith(prefix) and cls.__name__ in names for prefix, names in _KNOWN_BLOCKS.items()
    )
    if not known:
        return None
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    if norms:
        return norms[-1].num_features
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else None


def _apply_probe(block: nn.Module, inputs, output: Tensor) -> Tensor:
    return getattr(block, _PROBE)(output)


def instrument(
    model: nn.Module,
    *,
    probes: bool = True,
    grad_stats_ema_decay: float = 0.9,
    record_activations: bool = False,
    per_sample: bool = False,
    strict: bool = False,
) -> nn.Module:
    """Converts every batch-norm layer of ``model`` (convert_batchnorm) and, with ``probes``,
    puts a GradProbe on the output of every residual block it recognises (gradstats.models
    blocks; torchvision's and timm's ResNet, RegNet, MobileNet and EfficientNet blocks): the
    gradient on the skip stream, block by block.

    A probe is a submodule ``grad_probe`` of its block, applied by a forward hook, so parameter
    names, pretrained weights and state_dicts of the model are unchanged (plus statistics
    buffers). Calling it again adds nothing. ``per_sample`` as in convert_batchnorm. Returns
    the model.
    """
    convert_batchnorm(model, grad_stats_ema_decay=grad_stats_ema_decay, per_sample=per_sample, strict=strict)
    if not probes:
        return model
    for module in model.modules():
        channels = _residual_block_channels(module)
        if channels is None or hasattr(module, _PROBE):
            continue
        reference = next(module.parameters(), None)
        device = reference.device if reference is not None else None
        module.add_module(
            _PROBE,
            GradProbe(
                channels,
                grad_stats_ema_decay=grad_stats_ema_decay,
                record_activations=record_activations,
                device=device,
            ),
        )
        module.register_forward_hook(_apply_probe)
    return model


def probes(model: nn.Module) -> list[tuple[str, GradProbe]]:
    """(name, probe) of every GradProbe in ``model``, in module order (input side first for the
    models gradstats instruments)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GradProbe)]


def batchnorms(model: nn.Module) -> list[tuple[str, BatchNormRecorder]]:
    """(name, layer) of every recording batch-norm layer (GradStatBatchNorm2d, the recording
    class of any batch-norm class) in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BatchNormRecorder)]
