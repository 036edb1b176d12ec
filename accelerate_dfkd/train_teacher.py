"""`accelerate-dfkd train-teacher RECIPE.yaml [--key value ...]`: train a teacher on real data.

Data-free distillation starts from a trained teacher; for the benchmarks of the papers (LeNet-5 on
MNIST, ...) we train our own, with a recipe like any other (`recipes/mnist/teacher_lenet5.yaml`).
The weights go to `output` as safetensors (written atomically, never over an existing file unless
`overwrite` is true), with `<output>.json` holding the test score (top-1, or mIoU for the
segmentation set `shapes`, `recipes/shapes/teacher_deeplab.yaml`) and the configuration. Single
process: teachers of this size train in minutes on a CPU.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import save_file

from .config import ConfigError, build_configs, read_recipe
from .evaluation import (SHAPES_CLASSES, LabeledImages, evaluate_miou, evaluate_top1, load_digits_split,
                         load_mnist_split, load_shapes_split)
from .models import SEGMENTATION_MODELS, build_model
from .teachers import train_classifier
from .utils import atomic_write_bytes


@dataclass
class TeacherTrainingConfig:
    model: str = "lenet5"
    dataset: Literal["digits", "mnist", "shapes"] = "mnist"  # shapes: segmentation (per-pixel labels)
    data_dir: Optional[str] = None
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 32
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3  # Adam
    weight_decay: float = 5e-4
    seed: int = 0
    max_train_samples: Optional[int] = None  # a subset, for smoke tests
    output: str = "runs/teachers/teacher.safetensors"
    overwrite: bool = False
    num_threads: Optional[int] = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "num_classes", "in_channels", "image_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.output.endswith(".safetensors"):
            raise ConfigError(f"output must be a .safetensors path, got {self.output!r}")
        if self.dataset == "shapes" and (self.num_classes, self.in_channels) != (len(SHAPES_CLASSES), 3):
            raise ConfigError(f"dataset shapes has num_classes={len(SHAPES_CLASSES)} {SHAPES_CLASSES} and "
                              f"in_channels=3, got {self.num_classes} and {self.in_channels}")
        if (self.dataset == "shapes") != (self.model in SEGMENTATION_MODELS):
            raise ConfigError(f"model {self.model!r} does not fit dataset {self.dataset!r}: the segmentation set "
                              f"shapes needs one of {sorted(SEGMENTATION_MODELS)}, and only it")


def load_split(config: TeacherTrainingConfig, split: str) -> LabeledImages:
    if config.dataset == "digits":
        return load_digits_split(split, config.image_size)
    if config.dataset == "shapes":
        return load_shapes_split(split, config.image_size)
    return load_mnist_split(split, config.image_size, config.data_dir)


def train_teacher(config: TeacherTrainingConfig) -> dict:
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite true to replace it, or choose another --output")
    train, test = load_split(config, "train"), load_split(config, "test")
    if config.max_train_samples:
        train = LabeledImages(train.images[: config.max_train_samples], train.labels[: config.max_train_samples],
                              train.name)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=config.num_classes, in_channels=config.in_channels)
    start = time.perf_counter()
    train_classifier(model, train, epochs=config.epochs, lr=config.learning_rate, batch_size=config.batch_size,
                     weight_decay=config.weight_decay, seed=config.seed)
    seconds = time.perf_counter() - start
    if config.dataset == "shapes":
        metric, score = "test_miou", evaluate_miou(model, test, num_classes=config.num_classes)
    else:
        metric, score = "test_top1", evaluate_top1(model, test, num_classes=config.num_classes)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, output)
    report = {"model": config.model, "dataset": config.dataset, metric: score, "train_samples": len(train),
              "train_seconds": seconds, "config": asdict(config)}
    atomic_write_bytes(output.with_suffix(".json"), json.dumps(report, indent=2).encode())
    return report


def main(recipe: Optional[str], overrides: dict[str, str]) -> dict:
    (config,) = build_configs(read_recipe(recipe, overrides), [TeacherTrainingConfig],
                              f" in {recipe}" if recipe else "")
    report = train_teacher(config)
    metric = "test_miou" if "test_miou" in report else "test_top1"
    print(f"teacher: {config.model} on {config.dataset}, {metric} {report[metric]:.2f}% "
          f"after {report['train_seconds']:.0f} s -> {config.output}", flush=True)
    return report
