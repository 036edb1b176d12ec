"""Tensor batch augmentations: shapes, reproducibility, exactness and differentiability."""

import pytest
import torch

from accelerate_dfkd.synthesis import Augment, random_crop_with_padding, random_horizontal_flip, random_resized_crop
from accelerate_dfkd.synthesis.augment import CMI_LOCAL_SCALE


def _images(b=6, c=3, h=8, w=8, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fn", [
    lambda x, g: random_crop_with_padding(x, 4, g),
    lambda x, g: random_crop_with_padding(x, 2, g, pad_mode="reflect"),
    lambda x, g: random_horizontal_flip(x, g),
    lambda x, g: random_resized_crop(x, g),
    lambda x, g: random_resized_crop(x, g, scale=CMI_LOCAL_SCALE),
    lambda x, g: Augment(g)(x),
    lambda x, g: Augment(g, resized_crop_scale=CMI_LOCAL_SCALE)(x),
])
def test_shape_preserved_and_same_generator_state_gives_same_output(fn):
    x = _images(h=8, w=12)
    a = fn(x, torch.Generator().manual_seed(5))
    b = fn(x, torch.Generator().manual_seed(5))
    c = fn(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_resized_crop_output_size():
    out = random_resized_crop(_images(), torch.Generator().manual_seed(0), size=(5, 7))
    assert out.shape == (6, 3, 5, 7)


def test_flip_is_exact_for_p_one_and_identity_for_p_zero():
    x = _images()
    assert torch.equal(random_horizontal_flip(x, torch.Generator(), p=1.0), x.flip(-1))
    assert torch.equal(random_horizontal_flip(x, torch.Generator(), p=0.0), x)


def test_crop_with_padding_shifts_a_known_pattern():
    # Pixel value = 10 * row + col + 1, so any window is identified by its top-left value.
    h = w = 6
    pattern = (10 * torch.arange(h)[:, None] + torch.arange(w)[None, :] + 1).float()
    x = pattern.expand(64, 1, h, w).contiguous()
    out = random_crop_with_padding(x, 2, torch.Generator().manual_seed(0))
    shifts = set()
    for img in out[:, 0]:
        nz = img.nonzero()
        r0, c0 = int(nz[:, 0].min()), int(nz[:, 1].min())        # first kept input pixel
        v = img[r0, c0].item() - 1
        dy, dx = int(v // 10) - r0, int(v % 10) - c0              # out[r, c] = in[r + dy, c + dx]
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        expected = torch.zeros(h, w)
        rs, cs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
        expected[rs, cs] = pattern[max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
        assert torch.equal(img, expected)                          # a pure shift with zero fill
        shifts.add((dy, dx))
    assert len(shifts) > 10                                        # offsets vary per sample
    # Reflect padding fills the border with image content instead of zeros.
    out = random_crop_with_padding(x, 2, torch.Generator().manual_seed(0), pad_mode="reflect")
    assert (out > 0).all()


def test_resized_crop_is_differentiable():
    x = _images().requires_grad_(True)
    out = random_resized_crop(x, torch.Generator().manual_seed(0), scale=CMI_LOCAL_SCALE)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x.grad = None
    Augment(torch.Generator().manual_seed(0))(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_resized_crop_with_full_scale_and_unit_ratio_is_the_identity():
    x = _images(h=8, w=8)
    out = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-5)


def test_augment_state_round_trip():
    aug = Augment(torch.Generator().manual_seed(3))
    x = _images()
    state = aug.state_dict()
    first = aug(x)
    aug.load_state_dict(state)
    assert torch.equal(aug(x), first)
