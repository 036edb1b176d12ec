"""Batch augmentations on tensors, on the images' device, differentiable w.r.t. the images.

The reference code augments synthetic images with kornia (`RandomCrop(32, padding=4)` +
`RandomHorizontalFlip` for the CIFAR KD and inversion views; CMI's "local" view is
`RandomResizedCrop(32, scale=[0.25, 1])` + flip; FastDFKD on ImageNet uses `RandomResizedCrop(224,
scale=[0.75, 1])` + flip; see shared/reference/implementations.md 2.2 and 2.7). These functions do the
same per sample on a whole batch without PIL or torchvision, so synthesis can backpropagate through
them. Every random choice is drawn from the `rng` passed in (None: torch's global generator), with a
fixed number of draws per call, so the same generator state gives the same output.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: torchvision's RandomResizedCrop defaults (ImageNet training).
IMAGENET_SCALE = (0.08, 1.0)
#: CMI's local view (zju-vipa CMI `contrastive.py`, implementations.md 2.2).
CMI_LOCAL_SCALE = (0.25, 1.0)
#: FastDFKD's ImageNet synthesis augmentation (implementations.md 2.7).
FAST_IMAGENET_SCALE = (0.75, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _uniform(shape: Sequence[int], rng: Optional[torch.Generator], device: torch.device) -> Tensor:
    """U[0, 1) float64 draws from `rng` (on the generator's own device), moved to `device`."""
    gen_device = rng.device if rng is not None else torch.device("cpu")
    return torch.rand(*shape, generator=rng, dtype=torch.float64, device=gen_device).to(device)


def random_crop_with_padding(images: Tensor, padding: int = 4, rng: Optional[torch.Generator] = None,
                             pad_mode: Literal["constant", "reflect", "replicate"] = "constant") -> Tensor:
    """Pad every side by `padding` (zeros by default), then cut a random HxW window per sample.

    The offsets are integers in [0, 2*padding], one pair per sample, so a sample is its input shifted
    by (padding - offset) pixels with padded content entering from the side. Gradients flow to the
    kept pixels (gather)."""
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    b, _, h, w = images.shape
    offsets = (_uniform((2, b), rng, images.device) * (2 * padding + 1)).long().clamp_(max=2 * padding)
    if padding == 0:
        return images
    padded = F.pad(images, (padding, padding, padding, padding), mode=pad_mode)
    rows = offsets[0][:, None] + torch.arange(h, device=images.device)          # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=images.device)          # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_horizontal_flip(images: Tensor, rng: Optional[torch.Generator] = None, p: float = 0.5) -> Tensor:
    """Mirror each sample left-right with probability p (one draw per sample)."""
    flip = _uniform((images.shape[0],), rng, images.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def _crop_boxes(b: int, h: int, w: int, scale: Sequence[float], ratio: Sequence[float],
                rng: Optional[torch.Generator], device: torch.device, attempts: int = 10) -> Tensor:
    """torchvision's RandomResizedCrop box rule, per sample and in continuous pixel units:
    up to `attempts` tries of area ~ U(scale) * H*W and log aspect ratio ~ U(log ratio); the first box
    that fits is kept, else a centre crop with the aspect ratio clamped to `ratio`. A fixed number of
    draws (attempts * 4 per sample) keeps the generator's stream independent of the outcome.
    Returns (B, 4) float64 boxes (top, left, height, width)."""
    u = _uniform((4, b, attempts), rng, device)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    r = torch.exp(log_r)
    cw, ch = torch.sqrt(area * r), torch.sqrt(area / r)
    fits = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = torch.where(fits, torch.arange(attempts, device=device), attempts).min(dim=1).values  # (B,)
    found = first < attempts
    pick = first.clamp(max=attempts - 1)[:, None]
    cw, ch = cw.gather(1, pick)[:, 0], ch.gather(1, pick)[:, 0]
    top = u[2].gather(1, pick)[:, 0] * (h - ch)
    left = u[3].gather(1, pick)[:, 0] * (w - cw)
    # Fallback: whole image, aspect ratio clamped into `ratio`, centred.
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = float(w), w / min(ratio)
    elif in_ratio > max(ratio):
        fw, fh = h * max(ratio), float(h)
    else:
        fw, fh = float(w), float(h)
    top = torch.where(found, top, torch.full_like(top, (h - fh) / 2))
    left = torch.where(found, left, torch.full_like(left, (w - fw) / 2))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    return torch.stack([top, left, ch, cw], dim=1)


def random_resized_crop(images: Tensor, rng: Optional[torch.Generator] = None,
                        scale: Sequence[float] = IMAGENET_SCALE, ratio: Sequence[float] = DEFAULT_RATIO,
                        size: Optional[Sequence[int]] = None, mode: str = "bilinear") -> Tensor:
    """Crop a random box per sample (torchvision's area/aspect rule) and resize it to `size`
    (default: the input's HxW) with `affine_grid` + `grid_sample`, differentiable w.r.t. `images`.

    Defaults are torchvision's (scale (0.08, 1), ratio (3/4, 4/3)); for synthesis pass
    `CMI_LOCAL_SCALE` (0.25, 1) or `FAST_IMAGENET_SCALE` (0.75, 1). Unlike torchvision the box is not
    rounded to whole pixels, and no antialiasing is applied when a box is shrunk."""
    b, _, h, w = images.shape
    out_h, out_w = (h, w) if size is None else (int(size[0]), int(size[1]))
    boxes = _crop_boxes(b, h, w, scale, ratio, rng, images.device)
    top, left, ch, cw = boxes.unbind(1)
    # align_corners=False: normalised -1 and 1 are the outer pixel edges, so the box [left, left + cw]
    # maps to [2 left / W - 1, 2 (left + cw) / W - 1]: half-width cw / W around its centre.
    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=images.device)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    dtype = images.dtype if images.is_floating_point() else torch.float32
    grid = F.affine_grid(theta.to(dtype), [b, images.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(images.to(dtype), grid, mode=mode, padding_mode="border", align_corners=False)


class Augment:
    """(Random crop with padding | random resized crop) then horizontal flip, as one callable.

    Defaults are the CIFAR view of the reference code (crop 32 with padding 4, flip p 0.5); set
    `resized_crop_scale` (e.g. `CMI_LOCAL_SCALE`) to use a random resized crop instead of the padded
    crop. The generator is part of the object and of its state_dict, so a resumed run augments the same.
    Normalisation is left to the caller (generators emit [0, 1] images; normalise after augmenting).
    """

    def __init__(self, rng: Optional[torch.Generator] = None, padding: int = 4,
                 pad_mode: Literal["constant", "reflect", "replicate"] = "constant", flip_p: float = 0.5,
                 resized_crop_scale: Optional[Sequence[float]] = None,
                 resized_crop_ratio: Sequence[float] = DEFAULT_RATIO,
                 size: Optional[Sequence[int]] = None) -> None:
        self.rng = rng if rng is not None else torch.Generator()
        self.padding, self.pad_mode, self.flip_p = padding, pad_mode, flip_p
        self.resized_crop_scale, self.resized_crop_ratio, self.size = resized_crop_scale, resized_crop_ratio, size

    def __call__(self, images: Tensor) -> Tensor:
        if self.resized_crop_scale is not None:
            images = random_resized_crop(images, self.rng, self.resized_crop_scale, self.resized_crop_ratio,
                                         self.size)
        elif self.padding > 0:
            images = random_crop_with_padding(images, self.padding, self.rng, self.pad_mode)
        if self.flip_p > 0:
            images = random_horizontal_flip(images, self.rng, self.flip_p)
        return images

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
