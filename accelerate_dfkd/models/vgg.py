"""VGG-11 with BatchNorm for CIFAR-sized inputs (Simonyan & Zisserman, 2015, configuration "A").

Follows the CIFAR VGG of RepDistiller (Tian et al., "Contrastive Representation Distillation",
repository HobbitLong/RepDistiller, ``models/vgg.py``), reused by zju-vipa/Fast-Datafree and CMI
(``datafree/models/classifiers/vgg.py``): five blocks of conv3x3(bias)-BN-ReLU with widths
[64], [128], [256, 256], [512, 512], [512, 512], then global average pooling and one Linear layer.
Module names (``block{0..4}.{i}``, ``classifier``) match that reference, so its weights load.

Pooling choice: the reference max-pools after blocks 0-2 always but after block 3 only for 64x64
inputs, so at 32x32 its block 4 runs at 4x4. Here the pool after block 3 is on by default
(``pool_after_block3=True``, standard VGG downsampling: block 4 runs at 2x2 for 32x32 inputs), and
the final pooling is adaptive so any input of at least 16x16 works. Pass ``pool_after_block3=False``
to reproduce the reference exactly at 32x32 (e.g. to evaluate one of its checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

VGG11_CFG: list[list[int]] = [[64], [128], [256, 256], [512, 512], [512, 512]]


def _make_block(cin: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=True), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Five conv blocks, max-pools between them, adaptive average pool, Linear classifier."""

    def __init__(
        self,
        cfg: Sequence[Sequence[int]] = VGG11_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        pool_after_block3: bool = True,
    ) -> None:
        super().__init__()
        widths_in = [in_channels] + [block[-1] for block in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _make_block(cin, block) for cin, block in zip(widths_in, cfg)
        )
        self.pool = nn.MaxPool2d(2, 2)
        self.pool_after_block3 = pool_after_block3
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block0(x))
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        x = self.block3(x)
        if self.pool_after_block3:
            x = self.pool(x)
        x = self.block4(x)
        return self.classifier(self.avgpool(x).flatten(1))


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, pool_after_block3: bool = True) -> VGG:
    return VGG(
        VGG11_CFG, num_classes=num_classes, in_channels=in_channels, pool_after_block3=pool_after_block3
    )
