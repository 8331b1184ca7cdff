"""CIFAR-style ResNets (He et al. 2016, section 4.2) and the ablations of the gradient
propagation analysis: depth 6n + 2, three stages of n residual blocks with 16, 32 and 64 channels
(times ``width``, rounded to the nearest integer: width 1.4 gives 22, 45 and 90), global average
pooling and a linear head.

Forms:
  post-activation (the original): block = relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))
  pre-activation (He et al. 2016, identity mappings): block = conv2(relu(bn2(conv1(relu(bn1 x))))) + shortcut
Switches (the paper's ablations):
  bn=False        every norm layer becomes the identity; the convolutions keep their He
                  initialisation (kaiming normal, fan_in, ReLU gain), which preserves forward
                  variance per conv-ReLU, so without BN the skip sums make variance grow.
  skip=False      no shortcut: a plain network of the same depth.
  zero_init=True  the last norm layer of every residual branch starts with weight 0, so each
                  branch outputs 0 and (with skip) each block is the identity at initialisation.
When a block changes shape, its shortcut is a strided 1x1 convolution (plus a norm layer in the
post-activation form; applied to the block's pre-activation in the pre-activation form).

The norm layer is passed in (``norm_layer=``), as torchvision does, so the same code builds the
plain model (nn.BatchNorm2d) and the instrumented one (GradStatBatchNorm2d).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]

VARIANTS = {
    # name: (bn, skip, zero_init)
    "bn_skip": (True, True, False),
    "skip": (False, True, False),
    "bn": (True, False, False),
    "plain": (False, False, False),
    "zero_init": (True, True, True),
}


BASE_CHANNELS = (16, 32, 64)


def stage_channels(width: float) -> list[int]:
    """The three stages' channel counts: 16, 32 and 64 times ``width``, each rounded to the nearest
    integer (Python's round). ValueError unless every stage gets at least one channel."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < math.inf:
        raise ValueError(f"width must be a positive number, got {width!r}")
    channels = [round(base * width) for base in BASE_CHANNELS]
    if channels[0] < 1:
        raise ValueError(f"width {width} leaves the first stage {BASE_CHANNELS[0]} x {width} < 0.5 channels")
    return channels


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block; ``out_channels`` is what its output carries."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer, skip: bool = True) -> None:
        super().__init__()
        self.out_channels = cout
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = norm_layer(cout)
        self.skip = skip
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.skip:
            out = out + self.shortcut(x)
        return self.relu(out)


class PreActBlock(nn.Module):
    """Pre-activation basic block: no ReLU after the addition, so the skip stream is the identity."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer, skip: bool = True) -> None:
        super().__init__()
        self.out_channels = cout
        self.bn1 = norm_layer(cin)
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = norm_layer(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.skip = skip
        self.shortcut: nn.Module | None = None
        if skip and (stride != 1 or cin != cout):
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        if not self.skip:
            return out
        return out + (x if self.shortcut is None else self.shortcut(pre))


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        width: float = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        in_channels: int = 3,
        *,
        preact: bool = False,
        bn: bool = True,
        skip: bool = True,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        channels = stage_channels(width)
        if zero_init and not bn:
            raise ValueError("zero_init zeroes the last norm layer of each branch, so it needs bn=True")
        norm: NormLayer = norm_layer if bn else (lambda channels: nn.Identity())
        self.preact = preact
        block_type = PreActBlock if preact else BasicBlock
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = _conv3x3(in_channels, channels[0])
        # Post-activation: stem conv-norm-relu. Pre-activation: the blocks normalise their own
        # inputs, and a final norm-relu precedes the pooling.
        self.bn1 = norm(channels[0]) if not preact else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = channels[0]
        for index, cout in enumerate(channels):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(block_type(cin, cout, stride, norm, skip=skip))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.final_bn = norm(cin) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if zero_init:
            for block in self.blocks():
                nn.init.zeros_(block.last_norm().weight)

    def blocks(self) -> list[nn.Module]:
        """The residual blocks, from the input side to the output side."""
        return [*self.layer1, *self.layer2, *self.layer3]

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if not self.preact:
            x = self.relu(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.preact:
            x = self.relu(self.final_bn(x))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(depth: int = 20, **kwargs) -> CifarResNet:
    return CifarResNet(depth, **kwargs)


def cifar_resnet_variant(variant: str, depth: int = 20, **kwargs) -> CifarResNet:
    """A CifarResNet of one of the named ablations in VARIANTS."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    bn, skip, zero_init = VARIANTS[variant]
    return CifarResNet(depth, bn=bn, skip=skip, zero_init=zero_init, **kwargs)
