"""ResNet-18/34 "8x" for 32x32 images, the CIFAR teacher/student of DAFL and DFAD.

Follows the design of DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019,
repository huawei-noah/Efficient-Computing, ``DAFL/resnet.py``) reused by DFAD
(VainF/Data-Free-Adversarial-Distillation, ``network/resnet_8x.py``): an ImageNet ResNet with a
3x3 stride-1 stem and no max-pool, so a 32x32 input reaches the last stage at 4x4 ("8x" smaller
downsampling than the ImageNet model). Adaptive average pooling replaces the reference's fixed
4x4 pool, so other resolutions work too. Parameter names (``conv1``, ``bn1``, ``layer1..4``,
``shortcut``, ``linear``) follow the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()  # empty Sequential is the identity, as in the reference
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet8x(nn.Module):
    """Four stages of BasicBlocks, widths 64/128/256/512, strides 1/2/2/2."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.in_planes = 64
        self.layer1 = self._make_stage(64, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(128, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(256, num_blocks[2], stride=2)
        self.layer4 = self._make_stage(512, num_blocks[3], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)
        # He (fan-out) init for convs, BN as identity: the usual choice for training from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out).flatten(1))


def resnet18_8x(num_classes: int = 10, in_channels: int = 3) -> ResNet8x:
    return ResNet8x([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


def resnet34_8x(num_classes: int = 10, in_channels: int = 3) -> ResNet8x:
    return ResNet8x([3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)
