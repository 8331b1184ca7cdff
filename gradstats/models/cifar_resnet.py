"""CIFAR-style ResNets (He et al. 2016, section 4.2): depth 6n + 2, three stages of n basic
blocks with 16, 32 and 64 channels (times `width`), global average pooling and a linear head.

The norm layer is passed in (``norm_layer=``), as torchvision does, so the same code builds the
plain model (nn.BatchNorm2d) and the instrumented one (GradStatBatchNorm2d).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3 - norm - relu - conv3x3 - norm, plus the shortcut, then relu. When the shape
    changes the shortcut is a strided 1x1 conv and a norm layer (option B of the paper)."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = norm_layer(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        blocks_per_stage = (depth - 2) // 6
        channels = [16 * width, 32 * width, 64 * width]
        self.conv1 = _conv3x3(in_channels, channels[0])
        self.bn1 = norm_layer(channels[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = channels[0]
        for index, cout in enumerate(channels):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, norm_layer))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(depth: int = 20, **kwargs) -> CifarResNet:
    return CifarResNet(depth, **kwargs)
