"""PNG image grids without Pillow: a grid of images, min-max scaled, written as an 8-bit PNG."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from .utils import atomic_write_bytes


def make_grid(images: Tensor, nrow: int = 8, padding: int = 1) -> Tensor:
    """(N, C, H, W) -> (C, rows*(H+p)+p, nrow*(W+p)+p) uint8, each image scaled to [0, 255] on its own
    (synthetic images live in normalised space, so per-image scaling is what makes them visible)."""
    images = images.detach().float().cpu()
    n, c, h, w = images.shape
    flat = images.reshape(n, -1)
    lo, hi = flat.min(dim=1).values.view(n, 1, 1, 1), flat.max(dim=1).values.view(n, 1, 1, 1)
    images = ((images - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.zeros(c, rows * (h + padding) + padding, ncol * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def encode_png(image: Tensor) -> bytes:
    """(C, H, W) uint8 with C in {1, 3} -> PNG bytes (filter type 0 per row, zlib-compressed)."""
    c, h, w = image.shape
    if c not in (1, 3):
        raise ValueError(f"PNG grids need 1 or 3 channels, got {c}")
    pixels = image.permute(1, 2, 0).contiguous().numpy()
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8, upscale: int = 1) -> Path:
    grid = make_grid(images, nrow=nrow)
    if upscale > 1:  # tiny images (8x8 digits) are unreadable at 1:1
        grid = grid.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_png(grid))
    return path
