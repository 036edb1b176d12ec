"""LeNet-5 and LeNet-5-half for 32x32 inputs (MNIST padded to 32x32).

Follows the LeNet-5 / LeNet-5-half pair used by DFAD (Fang et al., "Data-Free Adversarial
Distillation", repository VainF/Data-Free-Adversarial-Distillation, ``network/lenet.py``), which is
also the MNIST pair of DAFL: three 5x5 convolutions (the last one collapses the 5x5 map to 1x1),
two fully connected layers, ReLU activations, no BatchNorm. The "half" variant halves every width.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5: ``in_channels x 32 x 32`` -> logits. The input size is fixed by the architecture."""

    input_size = 32

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, f1 = (max(1, int(round(w * width_mult))) for w in (6, 16, 120, 84))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),  # 32 -> 28
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 14
            nn.Conv2d(c1, c2, kernel_size=5),  # -> 10
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 5
            nn.Conv2d(c2, c3, kernel_size=5),  # -> 1
            nn.ReLU(),
        )
        self.fc = nn.Sequential(nn.Linear(c3, f1), nn.ReLU())
        self.classifier = nn.Linear(f1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            # Without this the flatten below fails with an opaque matmul shape error.
            raise ValueError(
                f"LeNet-5 needs {self.input_size}x{self.input_size} inputs, got "
                f"{tuple(x.shape[-2:])}; pad 28x28 MNIST by 2 pixels on each side"
            )
        x = self.features(x).flatten(1)
        return self.classifier(self.fc(x))


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """LeNet-5 (61,706 parameters for 1 channel and 10 classes)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels)


def lenet5_half(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """LeNet-5-half: every width halved (the usual DFKD MNIST student)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, width_mult=0.5)
