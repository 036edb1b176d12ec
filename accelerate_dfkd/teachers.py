"""Teachers: loading a user's checkpoint (never unpickling modules), validating that it is what the
recipe says, and training the built-in digits teacher on real data (the one place a teacher is
trained; a DFKD student never sees these images)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError
from .evaluation import IGNORE_INDEX, LabeledImages, load_digits_split, load_shapes_split
from .models import build_model, load_checkpoint_into
from .utils import logits_of

BUILTIN_PREFIX = "pretrained:"


def cache_dir() -> Path:
    return Path(os.environ.get("ACCELERATE_DFKD_CACHE", Path.home() / ".cache" / "accelerate_dfkd"))


def train_classifier(model: nn.Module, data: LabeledImages, *, epochs: int, lr: float = 1e-2,
                     batch_size: int = 64, weight_decay: float = 5e-4, seed: int = 0) -> nn.Module:
    """Plain supervised training (Adam, cosine LR, random-shift augmentation) on real data. Per-pixel
    labels (N, H, W) train a segmentation net: they shift with their pixels, IGNORE_INDEX is not scored."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(data) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, y = data.images[idx], data.labels[idx]
            # a shift of up to 1 pixel: cheap augmentation that buys a point or two on 8x8 digits
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            if y.dim() == 3:  # segmentation
                y = torch.roll(y, shifts=shift, dims=(1, 2))
                loss = nn.functional.cross_entropy(logits_of(model(x)), y, ignore_index=IGNORE_INDEX)
            else:
                loss = nn.functional.cross_entropy(logits_of(model(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def pretrained_digits_teacher(model_name: str, image_size: int, num_classes: int = 10, in_channels: int = 1) -> Path:
    """The embedded default teacher: `model_name` trained on the fixed 70% digits split, cached as
    safetensors. Deterministic from seed 0; written atomically so parallel ranks never read half a file."""
    # bump the version when the training recipe changes, so stale caches are not reused
    path = cache_dir() / "teachers" / f"{model_name}-digits{image_size}-v1.safetensors"
    if path.is_file():
        return path
    if num_classes != 10 or in_channels != 1:
        raise ConfigError("pretrained:digits needs num_classes=10 and in_channels=1")
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=1)
    # One thread: floating-point reductions then run in one order, so every machine (and every
    # rank of a launch) trains the same teacher bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_classifier(model, load_digits_split("train", image_size), epochs=30, lr=1e-2, seed=0)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


# The built-in shapes teacher's training: recipes/shapes/teacher_deeplab.yaml (keep the two in step).
SHAPES_TEACHER_EPOCHS, SHAPES_TEACHER_LR = 15, 3e-3


def pretrained_shapes_teacher(model_name: str, image_size: int, num_classes: int = 4, in_channels: int = 3) -> Path:
    """The segmentation demo's teacher: `model_name` (a SEGMENTATION_MODELS net) trained on the procedural
    shapes TRAIN split, cached as safetensors like the digits teacher (deterministic, one thread, atomic).
    About 5 minutes on one CPU thread for deeplab_lite, once per cache."""
    from .evaluation import SHAPES_CLASSES
    from .models import SEGMENTATION_MODELS

    path = cache_dir() / "teachers" / f"{model_name}-shapes{image_size}-v1.safetensors"
    if path.is_file():
        return path
    if (num_classes, in_channels) != (len(SHAPES_CLASSES), 3) or model_name not in SEGMENTATION_MODELS:
        raise ConfigError(f"pretrained:shapes needs a segmentation model ({sorted(SEGMENTATION_MODELS)}), "
                          f"num_classes={len(SHAPES_CLASSES)} and in_channels=3; got {model_name!r}, "
                          f"{num_classes}, {in_channels}")
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_classifier(model, load_shapes_split("train", image_size), epochs=SHAPES_TEACHER_EPOCHS,
                         lr=SHAPES_TEACHER_LR, seed=0)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def resolve_checkpoint(spec: str, model_name: str, image_size: int, num_classes: int, in_channels: int) -> Path:
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name == "shapes":
            return pretrained_shapes_teacher(model_name, image_size, num_classes, in_channels)
        if name != "digits":
            raise ConfigError(f"unknown built-in teacher {spec!r}; the built-in ones are 'pretrained:digits' "
                              "and 'pretrained:shapes' (segmentation)")
        return pretrained_digits_teacher(model_name, image_size, num_classes, in_channels)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"teacher_checkpoint {spec} does not exist; give a .safetensors or torch state-dict file")
    return path


def check_classifier_output(model: nn.Module, what: str, image_shape: tuple[int, int, int], num_classes: int,
                            device: torch.device | str = "cpu", task: str = "classification") -> None:
    """A probe forward pass: the model must map the declared image shape to (N, num_classes) logits
    (classification) or (N, num_classes, H', W') logits (segmentation)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(torch.zeros(2, *image_shape, device=device)))
    except Exception as err:  # noqa: BLE001 - reported with the fix, then re-raised as a config error
        raise ConfigError(f"the {what} cannot run on images of shape {tuple(image_shape)} "
                          f"({type(err).__name__}: {err}); check in_channels and image_size") from err
    finally:
        model.train(was_training)
    expected_dim = 2 if task == "classification" else 4
    if out.dim() != expected_dim or out.shape[1] != num_classes:
        want = f"(2, {num_classes})" if task == "classification" else f"(2, {num_classes}, H, W)"
        hint = {(2, 4): "; per-pixel logits: set task: segmentation",
                (4, 2): "; one logit vector per image: set task: classification"}.get((expected_dim, out.dim()), "")
        raise ConfigError(f"the {what} outputs shape {tuple(out.shape)} for a batch of 2, but logits of shape "
                          f"{want} were expected: check num_classes (and that the model returns logits){hint}")


def load_teacher(name: str, checkpoint: Optional[str], *, num_classes: int, in_channels: int, image_size: int,
                 task: str = "classification") -> nn.Module:
    """Build the zoo model `name`, load its weights strictly, freeze it, and validate its outputs.
    `hf:<dir or hub id>` loads a transformers model instead (integrations/hf_models.py)."""
    if name.startswith("hf:"):
        from .integrations.hf_models import load_hf_model

        model = freeze(load_hf_model(name, role="teacher", num_classes=num_classes, in_channels=in_channels,
                                     task=task, checkpoint=checkpoint))
        check_classifier_output(model, f"teacher {name!r}", (in_channels, image_size, image_size), num_classes,
                                task=task)
        return model
    model = build_model(name, num_classes=num_classes, in_channels=in_channels)
    path = resolve_checkpoint(checkpoint, name, image_size, num_classes, in_channels)
    try:
        load_checkpoint_into(model, path, what="teacher")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    freeze(model)
    check_classifier_output(model, f"teacher {name!r}", (in_channels, image_size, image_size), num_classes, task=task)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """eval() and no parameter gradients, but still differentiable w.r.t. its input (DESIGN.md fact 4)."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_student(name: str, checkpoint: Optional[str], *, num_classes: int, in_channels: int, image_size: int,
                 task: str = "classification") -> nn.Module:
    if name.startswith("hf:"):  # a transformers model (integrations/hf_models.py)
        from .integrations.hf_models import load_hf_model

        model = load_hf_model(name, role="student", num_classes=num_classes, in_channels=in_channels, task=task,
                              checkpoint=checkpoint)
        check_classifier_output(model, f"student {name!r}", (in_channels, image_size, image_size), num_classes,
                                task=task)
        return model
    model = build_model(name, num_classes=num_classes, in_channels=in_channels)
    if checkpoint:
        try:
            load_checkpoint_into(model, checkpoint, what="student")
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
    check_classifier_output(model, f"student {name!r}", (in_channels, image_size, image_size), num_classes, task=task)
    return model
