"""Putting the recording modules into existing models and taking them out again:
convert_batchnorm (nn.BatchNorm2d -> GradStatBatchNorm2d, parameters shared), instrument
(conversion plus a GradProbe at the output of every residual block it recognises), the lists of a
model's recording modules, and state_dicts and buffer names without or of the statistics."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .modules import GradProbe, GradStatBatchNorm2d, is_state_key


def convert_batchnorm(module: nn.Module, *, grad_stats_ema_decay: float = 0.9) -> nn.Module:
    """Replaces every nn.BatchNorm2d in ``module`` by a GradStatBatchNorm2d and returns it.

    The replacement carries the same Parameter and buffer objects (an optimizer built before the
    conversion keeps working) and the same training mode. Only modules whose type is exactly
    nn.BatchNorm2d are replaced: subclasses may change forward, and GradStatBatchNorm2d layers
    already converted are left alone, so converting twice is harmless. Like
    nn.SyncBatchNorm.convert_sync_batchnorm, a bare nn.BatchNorm2d is returned converted.
    """
    if type(module) is nn.BatchNorm2d:
        return converted_layer(module, grad_stats_ema_decay)
    for name, child in module.named_children():
        converted = convert_batchnorm(child, grad_stats_ema_decay=grad_stats_ema_decay)
        if converted is not child:
            setattr(module, name, converted)
    return module


def converted_layer(
    bn: nn.BatchNorm2d, ema_decay: float, cls: type | None = None, **extra
) -> GradStatBatchNorm2d:
    """A ``cls`` (GradStatBatchNorm2d by default) that replaces ``bn``, sharing its parameters and
    buffers; ``extra`` goes to its constructor. convert_batchnorm and convert_sync_batchnorm build
    their layers with it."""
    reference = bn.weight if bn.weight is not None else bn.running_mean
    device = reference.device if reference is not None else None
    new = (cls or GradStatBatchNorm2d)(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        device=device,
        grad_stats_ema_decay=ema_decay,
        **extra,
    )
    # Share, do not copy: same Parameters and buffers as the original layer.
    for name, param in bn._parameters.items():
        new._parameters[name] = param
    for name, buf in bn._buffers.items():
        new._buffers[name] = buf
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def plain_state_dict(source: nn.Module | dict[str, Any]) -> dict[str, Any]:
    """A state_dict without gradstats' statistics buffers, loadable (strict=True) into the same
    model built with plain nn.BatchNorm2d layers."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    return {k: v for k, v in state.items() if not is_state_key(k)}


# -- instrument: BN layers converted, probes at residual-block outputs ---------------------------

_PROBE = "grad_probe"


def _residual_block_channels(module: nn.Module) -> int | None:
    """Output channels of a residual block this library knows how to probe, else None:
    gradstats.models blocks, and torchvision's BasicBlock and Bottleneck."""
    from .models.cifar_resnet import BasicBlock, PreActBlock

    if isinstance(module, (BasicBlock, PreActBlock)):
        return module.out_channels
    cls = type(module)
    if cls.__module__.startswith("torchvision.models") and cls.__name__ in ("BasicBlock", "Bottleneck"):
        last_conv = module.conv3 if cls.__name__ == "Bottleneck" else module.conv2
        return last_conv.out_channels
    return None


def _apply_probe(block: nn.Module, inputs, output: Tensor) -> Tensor:
    return getattr(block, _PROBE)(output)


def instrument(
    model: nn.Module,
    *,
    probes: bool = True,
    grad_stats_ema_decay: float = 0.9,
    record_activations: bool = False,
) -> nn.Module:
    """Converts every nn.BatchNorm2d of ``model`` (convert_batchnorm) and, with ``probes``, puts a
    GradProbe on the output of every residual block it recognises (gradstats.models blocks,
    torchvision BasicBlock/Bottleneck): the gradient on the skip stream, block by block.

    A probe is a submodule ``grad_probe`` of its block, applied by a forward hook, so parameter
    names, pretrained weights and state_dicts of the model are unchanged (plus statistics
    buffers). Calling it again adds nothing. Returns the model.
    """
    convert_batchnorm(model, grad_stats_ema_decay=grad_stats_ema_decay)
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


def gradstats_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every gradstats statistics buffer in ``model``: what
    DistributedDataParallel must not broadcast from rank 0 (each rank records its own)."""
    return [name for name, _ in model.named_buffers() if is_state_key(name)]


def probes(model: nn.Module) -> list[tuple[str, GradProbe]]:
    """(name, probe) of every GradProbe in ``model``, in module order (input side first for the
    models gradstats instruments)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GradProbe)]


def batchnorms(model: nn.Module) -> list[tuple[str, GradStatBatchNorm2d]]:
    """(name, layer) of every GradStatBatchNorm2d in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GradStatBatchNorm2d)]
