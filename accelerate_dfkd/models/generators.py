"""Image generators for data-free distillation: ``z`` of shape (N, nz) -> (N, channels, S, S).

- ``GeneratorA``: DFAD's "Generator-A" (Fang et al., "Data-Free Adversarial Distillation",
  VainF/Data-Free-Adversarial-Distillation, ``network/gan.py``), also DAFL's generator.
- ``GeneratorB``: DFAD's DCGAN-style "Generator-B" (Radford et al. 2016 transposed-conv stack).
- ``SigmoidGenerator``: the generator of zju-vipa/Fast-Datafree and CMI
  (``datafree/models/generator.py``, class ``Generator``).

Each class states in ``output_space`` what its images are, so callers know whether to normalise:
``"normalized"`` (already roughly standardised, feed to the teacher as is), ``"tanh"`` (in [-1, 1])
or ``"pixel"`` (in [0, 1], apply the data set's mean/std before the teacher).
"""

from __future__ import annotations

import torch
from torch import nn


def _check(name: str, nz: int, image_size: int, channels: int, multiple: int) -> None:
    if nz < 1 or channels < 1:
        raise ValueError(f"{name}: nz and channels must be positive, got nz={nz}, channels={channels}")
    if image_size < multiple or image_size % multiple != 0:
        examples = ", ".join(str(multiple * k) for k in (1, 2, 4, 8) if multiple * k >= 8)
        raise ValueError(
            f"{name} needs image_size divisible by {multiple} (e.g. {examples}); got {image_size}"
        )


class GeneratorA(nn.Module):
    """DFAD Generator-A: Linear -> BN -> 2 x (nearest x2, conv3x3, BN, LeakyReLU) -> conv3x3 -> Tanh
    -> BN (no affine).

    The last BatchNorm2d (no affine) standardises each output channel over the batch, so the
    images are already in the teacher's normalised input space: ``output_space = "normalized"``.
    Requires ``image_size % 4 == 0``.
    """

    output_space: str = "normalized"

    def __init__(self, nz: int = 256, image_size: int = 32, channels: int = 3, ngf: int = 64) -> None:
        super().__init__()
        _check("generator_a", nz, image_size, channels, 4)
        self.nz = nz
        self.init_size = image_size // 4
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.project(z.flatten(1))
        return self.body(out.view(out.shape[0], -1, self.init_size, self.init_size))


class GeneratorB(nn.Module):
    """DFAD Generator-B (DCGAN style): Linear -> BN -> 4 x (ConvT 4x4 s2, BN, LeakyReLU) -> conv3x3
    -> Tanh.

    Widths 8ngf -> 4ngf -> 2ngf -> ngf -> ngf. Images are in [-1, 1]: ``output_space = "tanh"``.
    Requires ``image_size % 16 == 0``.
    """

    output_space: str = "tanh"

    def __init__(self, nz: int = 256, image_size: int = 32, channels: int = 3, ngf: int = 64) -> None:
        super().__init__()
        _check("generator_b", nz, image_size, channels, 16)
        self.nz = nz
        self.init_size = image_size // 16
        self.project = nn.Linear(nz, 8 * ngf * self.init_size**2)
        layers: list[nn.Module] = [nn.BatchNorm2d(8 * ngf)]
        widths = [8 * ngf, 4 * ngf, 2 * ngf, ngf, ngf]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [
                nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),  # doubles H, W
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2),
            ]
        layers += [nn.Conv2d(ngf, channels, 3, stride=1, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        # DCGAN initialisation.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.project(z.flatten(1))
        return self.body(out.view(out.shape[0], -1, self.init_size, self.init_size))


class SigmoidGenerator(nn.Module):
    """zju-vipa Generator: Linear -> BN -> 2 x (nearest x2, conv3x3, BN, LeakyReLU) -> conv3x3
    -> Sigmoid.

    Images are in [0, 1] pixel space (``output_space = "pixel"``): the caller applies the data set's
    normalisation before the teacher. Requires ``image_size % 4 == 0``.
    """

    output_space: str = "pixel"

    def __init__(self, nz: int = 100, image_size: int = 32, channels: int = 3, ngf: int = 64) -> None:
        super().__init__()
        _check("sigmoid_generator", nz, image_size, channels, 4)
        self.nz = nz
        self.init_size = image_size // 4
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        # Convs followed by BN carry no bias (the BN shift replaces it).
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.project(z.flatten(1))
        return self.body(out.view(out.shape[0], -1, self.init_size, self.init_size))


def generator_a(nz: int = 256, image_size: int = 32, channels: int = 3, ngf: int = 64) -> GeneratorA:
    return GeneratorA(nz=nz, image_size=image_size, channels=channels, ngf=ngf)


def generator_b(nz: int = 256, image_size: int = 32, channels: int = 3, ngf: int = 64) -> GeneratorB:
    return GeneratorB(nz=nz, image_size=image_size, channels=channels, ngf=ngf)


def sigmoid_generator(
    nz: int = 100, image_size: int = 32, channels: int = 3, ngf: int = 64
) -> SigmoidGenerator:
    return SigmoidGenerator(nz=nz, image_size=image_size, channels=channels, ngf=ngf)
