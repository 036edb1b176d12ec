"""Loading pretrained weights (teachers, resumed students) safely and strictly.

Checkpoints are read as plain tensors only: ``.safetensors`` files through safetensors, anything
else through ``torch.load(weights_only=True)``, which refuses pickled modules or code. Common
wrappers are undone (a top-level ``state_dict``/``model`` entry, DataParallel's ``module.``
prefix), e.g. the akamaster CIFAR ResNet checkpoints
(``{'state_dict': {'module.conv1.weight': ...}, 'best_prec1': ...}``) load directly.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model")
_TOLERATED_MISSING_SUFFIX = "num_batches_tracked"  # absent from older checkpoints; unused in eval
_SHOW = 5  # how many keys an error message lists


def _clean(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': ...}``/``{'model': ...}``, strip ``module.``, check values are tensors."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source}: expected a state dict (a mapping of names to tensors), "
            f"got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{source}: not a state dict, entries that are not tensors: {bad[:_SHOW]} "
            "(save weights with torch.save(model.state_dict(), path))"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, on CPU, tensors only."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint file not found: {p} (check the path, or set DFKD_DATA_DIR to the folder "
            "holding the shared data, e.g. .../shared/data)"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(p), device="cpu")
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{p}: refused to unpickle (weights_only=True allows tensors and plain containers "
                "only; a whole pickled model is not loaded for safety). Re-save it with "
                f"torch.save(model.state_dict(), path). Original error: {e}"
            ) from e
    return _clean(obj, str(p))


def load_checkpoint_into(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    what: str = "teacher",
) -> None:
    """Load weights into ``model`` strictly; only missing ``num_batches_tracked`` buffers are tolerated.

    Raises ``ValueError`` naming the missing/unexpected keys and shape mismatches otherwise.
    """
    if isinstance(path_or_state_dict, Mapping):
        source = "state dict"
        state = _clean(path_or_state_dict, source)
    else:
        source = str(path_or_state_dict)
        state = load_state_dict_file(path_or_state_dict)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    tolerated = [k for k in missing if k.endswith(_TOLERATED_MISSING_SUFFIX)]
    missing = [k for k in missing if k not in tolerated]

    if missing or unexpected or mismatched:
        parts = [f"{what} checkpoint {source} does not match {type(model).__name__}:"]
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:_SHOW]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:_SHOW]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[:_SHOW]})")
        parts.append(f"Hint: does the checkpoint match --{what} <name>? check num_classes/in_channels.")
        raise ValueError(" ".join(parts))

    # Keep the model's own counters for the tolerated buffers, so the strict load below checks the rest.
    for k in tolerated:
        state[k] = expected[k]
    model.load_state_dict(state, strict=True)
