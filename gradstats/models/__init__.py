"""ResNets for gradient-propagation studies, built with whatever norm layer they are given."""

from .cifar_resnet import CifarResNet, cifar_resnet

__all__ = ["CifarResNet", "cifar_resnet"]
