"""ResNets for gradient-propagation studies, built with whatever norm layer they are given."""

from .cifar_resnet import VARIANTS, BasicBlock, CifarResNet, PreActBlock, cifar_resnet, cifar_resnet_variant

__all__ = ["VARIANTS", "BasicBlock", "CifarResNet", "PreActBlock", "cifar_resnet", "cifar_resnet_variant"]
