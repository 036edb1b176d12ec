"""Small CNNs for scikit-learn's 8x8 ``load_digits`` images.

Not from a paper: a minimal three-convolution network (VGG-style conv3x3-BN-ReLU stages, the last
two with stride 2, then global average pooling) sized so a teacher trains in seconds on CPU. The
teacher has BatchNorm on purpose: its running statistics are what BN-statistics-matching DFKD
methods (DeepInversion, CMI, Fast-DFKD) invert, so the embedded demo exercises that code path.
Both nets accept any input of at least 8x8 thanks to the adaptive pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class DigitsCNN(nn.Module):
    """conv3x3(w0) -> conv3x3(w1, s2) -> conv3x3(w2, s2), each with BN+ReLU; avg-pool; Linear."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 64)
    ) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w0, stride=1),
            _conv_bn_relu(w0, w1, stride=2),  # 8x8 -> 4x4
            _conv_bn_relu(w1, w2, stride=2),  # 4x4 -> 2x2
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> DigitsCNN:
    """Teacher for ``load_digits`` (widths 32/64/64, about 56k parameters)."""
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, widths=(32, 64, 64))


def digits_cnn_half(num_classes: int = 10, in_channels: int = 1) -> DigitsCNN:
    """Half-width student for ``load_digits`` (widths 16/32/32, about 14.6k parameters): the
    digits analogue of LeNet-5 -> LeNet-5-half."""
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, widths=(16, 32, 32))


def digits_cnn_small(num_classes: int = 10, in_channels: int = 1) -> DigitsCNN:
    """Student for ``load_digits`` (widths 8/16/16, about 3.8k parameters)."""
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, widths=(8, 16, 16))
