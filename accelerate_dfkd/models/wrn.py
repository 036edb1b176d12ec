"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

Follows the pre-activation variant used by ZSKT (Micaelli & Storkey, "Zero-shot Knowledge Transfer
via Adversarial Belief Matching", repository polo5/ZeroShotKnowledgeTransfer) and reused by
zju-vipa/Fast-Datafree and CMI (``datafree/models/classifiers/wresnet.py``). Module names
(``conv1``, ``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``) match
that reference so its checkpoints load. Average pooling is adaptive, so inputs other than 32x32
work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a (1x1 conv) shortcut.

    When the width changes, the shortcut convolution reads the already pre-activated input
    (BN-ReLU shared by both branches), as in the reference; otherwise it is the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes and stride == 1
        # camelCase kept from the reference so its state-dict keys match.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One stage: ``n`` blocks, the first one carrying the stride and the width change."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            BasicBlock(in_planes, out_planes, stride, dropout),
            *[BasicBlock(out_planes, out_planes, 1, dropout) for _ in range(n - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: widths 16, 16k, 32k, 64k; (depth-4)/6 blocks per stage; strides 1/2/2."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])  # final pre-activation before pooling
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(self.pool(out).flatten(1))


def wrn16_1(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 1, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def wrn16_2(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 2, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def wrn40_1(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, 1, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def wrn40_2(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(40, 2, num_classes=num_classes, in_channels=in_channels, dropout=dropout)
