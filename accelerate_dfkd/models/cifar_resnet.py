"""CIFAR ResNet-20/32/44/56/110 (He et al., "Deep Residual Learning for Image Recognition", 2016,
section 4.2) with the parameter-free "option A" shortcut.

Module and parameter names match the public pretrained checkpoints of akamaster/pytorch_resnet_cifar10
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``, ``layer{1,2,3}.{i}.bn{1,2}``, ``linear``), so those
load strictly once their DataParallel ``module.`` prefix is stripped (see ``loading.py``). Those
checkpoints expect inputs normalised with the ImageNet mean/std (``IMAGENET_MEAN``/``IMAGENET_STD``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class OptionAShortcut(nn.Module):
    """Identity shortcut for a block that halves the resolution and doubles the width.

    Subsamples every second pixel and zero-pads the new channels (half of them before, half after),
    so the shortcut adds no parameters, as in the paper's CIFAR experiments.
    """

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        pad = planes - in_planes
        # The reference pads planes//4 on each side, which equals (planes - in_planes) / 2 when the
        # width doubles; use the general form so uneven widths still produce the right shape.
        self.pad_before = pad // 2
        self.pad_after = pad - pad // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            OptionAShortcut(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """6n+2-layer ResNet: stem, three stages of ``n`` blocks (16/32/64 wide), average pool, linear."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_stage(16, n, stride=1)
        self.layer2 = self._make_stage(32, n, stride=2)
        self.layer3 = self._make_stage(64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.pool(out).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes=num_classes, in_channels=in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(44, num_classes=num_classes, in_channels=in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, num_classes=num_classes, in_channels=in_channels)
