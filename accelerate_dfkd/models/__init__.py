"""Classifier and generator zoo, looked up by name.

Two explicit registries (one line per entry, so ``grep`` finds every name):

- ``MODELS[name](num_classes=..., in_channels=...)`` -> classifier whose ``forward`` returns logits
  of shape (N, num_classes). Its last ``nn.Linear`` is the classifier layer, so penultimate
  features are the input of that layer (a forward hook on it retrieves them). The names in
  ``SEGMENTATION_MODELS`` are the exception: they return per-pixel logits (N, num_classes, H, W).
- ``GENERATORS[name](nz=..., image_size=..., channels=..., ngf=...)`` -> generator mapping
  (N, nz) noise to (N, channels, image_size, image_size) images; the class attribute
  ``output_space`` says whether the images are "normalized", "tanh" ([-1, 1]) or "pixel" ([0, 1]).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable

from torch import nn

from .cifar_resnet import resnet20, resnet32, resnet44, resnet56, resnet110
from .digits import digits_cnn, digits_cnn_half, digits_cnn_small
from .generators import generator_a, generator_b, sigmoid_generator
from .lenet import lenet5, lenet5_half
from .loading import load_checkpoint_into, load_state_dict_file
from .resnet_8x import resnet18_8x, resnet34_8x
from .segmentation import deeplab_lite, deeplab_lite_small, deeplabv3_mobilenetv2, deeplabv3_resnet50
from .vgg import vgg11_bn
from .wrn import wrn16_1, wrn16_2, wrn40_1, wrn40_2

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "lenet5_half": lenet5_half,
    "digits_cnn": digits_cnn,
    "digits_cnn_half": digits_cnn_half,
    "digits_cnn_small": digits_cnn_small,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18_8x": resnet18_8x,
    "resnet34_8x": resnet34_8x,
    "wrn16_1": wrn16_1,
    "wrn16_2": wrn16_2,
    "wrn40_1": wrn40_1,
    "wrn40_2": wrn40_2,
    "vgg11_bn": vgg11_bn,
    "deeplab_lite": deeplab_lite,
    "deeplab_lite_small": deeplab_lite_small,
    "deeplabv3_resnet50": deeplabv3_resnet50,
    "deeplabv3_mobilenetv2": deeplabv3_mobilenetv2,
}

# Models of MODELS whose logits are per-pixel (task: segmentation).
SEGMENTATION_MODELS = frozenset({"deeplab_lite", "deeplab_lite_small", "deeplabv3_resnet50", "deeplabv3_mobilenetv2"})

GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "generator_a": generator_a,
    "generator_b": generator_b,
    "sigmoid_generator": sigmoid_generator,
}


def _unknown_name_error(kind: str, name: str, known: Iterable[str]) -> ValueError:
    names = sorted(known)
    query = name.lower()
    close = difflib.get_close_matches(query, names, n=3, cutoff=0.6)
    # get_close_matches breaks ties alphabetically ("resnet2O" scores the same against resnet20 and
    # resnet32); prefer the candidate sharing the longest prefix with what was typed.
    close.sort(
        key=lambda c: (
            -difflib.SequenceMatcher(None, query, c).ratio(),
            -len(os.path.commonprefix([query, c])),
        )
    )
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(names)}")


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: object) -> nn.Module:
    """Build the classifier registered as ``name``; extra keyword arguments go to its constructor."""
    if name not in MODELS:
        raise _unknown_name_error("model", name, MODELS)
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def build_generator(name: str, nz: int, image_size: int, channels: int, **kwargs: object) -> nn.Module:
    """Build the generator registered as ``name`` (``ngf`` may be passed as a keyword)."""
    if name not in GENERATORS:
        raise _unknown_name_error("generator", name, GENERATORS)
    return GENERATORS[name](nz=nz, image_size=image_size, channels=channels, **kwargs)


__all__ = [
    "GENERATORS",
    "MODELS",
    "SEGMENTATION_MODELS",
    "build_generator",
    "build_model",
    "load_checkpoint_into",
    "load_state_dict_file",
]
