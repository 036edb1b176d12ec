"""PRE-DFKD's networks (Binici et al., AAAI 2022; code kuluhan/PRE-DFKD, ``networks/generator.py``).

- ``PreDFKDGenerator``: the DAFL generator (Linear -> BN -> 2 x (nearest x2, conv3x3, BN, LeakyReLU)
  -> conv3x3 -> Tanh -> BN(affine=False)), the same stack as DFAD's Generator-A
  (``models/generators.py``) with the reference's three knobs: spectral norm on the three convs
  (the *novel* generator ``Generator``; the *memory* generator ``MemoryGenerator`` has none),
  BatchNorm eps 0.8 after the two inner convs, and U(-0.08, 0.08) weights with zero biases.
- ``VAEEncoder``: the reference ``Encoder``: L2-normalise the image along its height axis,
  conv3x3(C -> nef) + BN + LReLU, conv3x3(nef -> 2nef) + BN + LReLU, nearest x0.5, conv3x3 stride 2
  (2nef -> 2nef) + BN, nearest x0.5, flatten, two Linear heads (mu, log-variance).
- ``VAE``: encoder + memory generator (the decoder) with the reparameterisation trick; the noise is
  passed in, so each rank draws it from its own random stream.

BatchNorm eps 0.8: the reference writes ``nn.BatchNorm2d(c, 0.8)``, a PyTorch-GAN idiom where the
second positional argument was meant as Keras' momentum 0.8 but is PyTorch's ``eps``. It is kept as
the default (``bn_eps``) because the published numbers were produced with it; ``bn_eps=1e-5`` gives
PyTorch's default. Widths: ``ngf=64`` gives the reference's 128/64 generator channels, ``nef=64``
the encoder's 64/128/128.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _uniform_init(module: nn.Module, init_range: float) -> None:
    """The reference's init: conv and linear weights U(-r, r), biases 0. r = 0 keeps PyTorch's."""
    if init_range <= 0:
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.uniform_(m.weight, -init_range, init_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PreDFKDGenerator(nn.Module):
    """DAFL generator with PRE-DFKD's options. Output is BN(affine=False)-standardised:
    ``output_space = "normalized"``. Requires ``image_size % 4 == 0``."""

    output_space: str = "normalized"

    def __init__(self, nz: int = 1000, image_size: int = 32, channels: int = 3, ngf: int = 64,
                 bn_eps: float = 0.8, spectral_norm: bool = False, init_range: float = 0.08) -> None:
        super().__init__()
        if nz < 1 or channels < 1 or ngf < 1:
            raise ValueError(f"nz, channels and ngf must be positive, got {nz}, {channels}, {ngf}")
        if image_size < 4 or image_size % 4:
            raise ValueError(f"the PRE-DFKD generator needs image_size divisible by 4 (e.g. 8, 16, 32); "
                             f"got {image_size}")
        self.nz = nz
        self.init_size = image_size // 4
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        convs = [nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1),
                 nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1),
                 nn.Conv2d(ngf, channels, 3, stride=1, padding=1)]
        _uniform_init(self.project, init_range)
        for conv in convs:
            _uniform_init(conv, init_range)
        if spectral_norm:  # initialise first: the parametrization then normalises the initial weights
            convs = [nn.utils.parametrizations.spectral_norm(conv) for conv in convs]
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),  # the reference's first BN keeps PyTorch's eps
            nn.Upsample(scale_factor=2, mode="nearest"),
            convs[0],
            nn.BatchNorm2d(2 * ngf, eps=bn_eps),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            convs[1],
            nn.BatchNorm2d(ngf, eps=bn_eps),
            nn.LeakyReLU(0.2),
            convs[2],
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.project(z.flatten(1))
        return self.body(out.view(out.shape[0], -1, self.init_size, self.init_size))


class VAEEncoder(nn.Module):
    """Image -> (mu, log-variance) of a diagonal Gaussian over the ``nz``-dimensional latent.
    Requires ``image_size % 8 == 0`` (two x0.5 resizes and one stride-2 conv)."""

    def __init__(self, nz: int = 1000, image_size: int = 32, channels: int = 3, nef: int = 64,
                 bn_eps: float = 0.8, init_range: float = 0.08, normalize_columns: bool = True) -> None:
        super().__init__()
        if nz < 1 or channels < 1 or nef < 1:
            raise ValueError(f"nz, channels and nef must be positive, got {nz}, {channels}, {nef}")
        if image_size < 8 or image_size % 8:
            raise ValueError(f"the PRE-DFKD encoder needs image_size divisible by 8 (e.g. 8, 16, 32); got {image_size}")
        self.normalize_columns = normalize_columns
        self.block0 = nn.Sequential(nn.Conv2d(channels, nef, 3, stride=1, padding=1),
                                    nn.BatchNorm2d(nef, eps=bn_eps), nn.LeakyReLU(0.2))
        self.block1 = nn.Sequential(nn.Conv2d(nef, 2 * nef, 3, stride=1, padding=1),
                                    nn.BatchNorm2d(2 * nef, eps=bn_eps), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(2 * nef, 2 * nef, 3, stride=2, padding=1),
                                    nn.BatchNorm2d(2 * nef))  # default eps and no activation, as the reference
        features = 2 * nef * (image_size // 8) ** 2
        self.fc_mu = nn.Linear(features, nz)
        self.fc_logvar = nn.Linear(features, nz)
        _uniform_init(self, init_range)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = F.normalize(images, p=2, dim=2) if self.normalize_columns else images  # reference: dim=2 (height)
        x = F.interpolate(self.block1(self.block0(x)), scale_factor=0.5, mode="nearest")
        x = F.interpolate(self.block2(x), scale_factor=0.5, mode="nearest").flatten(1)
        return self.fc_mu(x), self.fc_logvar(x)


class VAE(nn.Module):
    """Encoder + decoder (PRE-DFKD's memory generator). ``forward(images, noise)`` returns the
    reconstruction, mu and log-variance; ``noise`` ~ N(0, I) of shape (N, nz) is the caller's."""

    def __init__(self, encoder: VAEEncoder, decoder: PreDFKDGenerator) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.nz = decoder.nz

    def forward(self, images: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encoder(images)
        z = mu + torch.exp(0.5 * logvar) * noise.to(mu.dtype)
        return self.decoder(z), mu, logvar

    def state_bytes(self) -> int:
        """Bytes of every parameter and buffer: what a replay with this VAE keeps in memory."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))


def vae_kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent, batch mean (the reference's
    ``mean(-0.5 * sum(1 + log_var - mu^2 - exp(log_var), dim=1))``), in float32."""
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


def pre_dfkd_vae(nz: int = 1000, image_size: int = 32, channels: int = 3, ngf: int = 64, nef: int = 64,
                 bn_eps: float = 0.8, init_range: float = 0.08, normalize_columns: bool = True) -> VAE:
    """PRE-DFKD's memory VAE: ``VAEEncoder`` + a ``PreDFKDGenerator`` without spectral norm."""
    encoder = VAEEncoder(nz=nz, image_size=image_size, channels=channels, nef=nef, bn_eps=bn_eps,
                         init_range=init_range, normalize_columns=normalize_columns)
    decoder = PreDFKDGenerator(nz=nz, image_size=image_size, channels=channels, ngf=ngf, bn_eps=bn_eps,
                               spectral_norm=False, init_range=init_range)
    return VAE(encoder, decoder)
