"""Configuration: the loop's `DistillConfig`, the `MethodConfig` base, and flat YAML recipes.

A recipe is one flat YAML mapping. Its keys set the fields of `DistillConfig` (how to run) and of
the chosen method's config dataclass (what to run). Command-line `--key value` pairs override it.
A key that neither dataclass knows is an error with a did-you-mean suggestion: a typo must never
silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A recipe or command-line value is wrong; the message says what to change."""


def check_ema_decay(decay: float) -> None:
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"student_ema_decay must be in (0, 1), e.g. 0.999 (an average over about 1000 steps), "
                          f"or none to turn it off; got {decay}")


@dataclass
class MethodConfig:
    """Fields every method has. Each method subclasses this with its own defaults and cites them."""

    # How the student learns from a synthetic batch (the method's loss hook).
    # The reference code silently swaps criteria per method (implementations.md section 1.2),
    # so each method states its own here.
    student_loss: Literal["kl", "l1"] = "kl"
    temperature: float = 1.0
    # Student optimizer steps between two synthesis rounds (`kd_steps` in the zju-vipa loop).
    student_steps_per_round: int = 1
    # Synthesis-only rounds before the first student step (FastDFKD: 20 warm-up epochs of synthesis
    # without KD, Fast-Datafree datafree_kd.py `if epoch >= args.warmup: train(...)`). 0: none.
    warmup_rounds: int = 0


@dataclass
class DistillConfig:
    """How a distillation run is set up: models, data for evaluation, the loop, checkpoints."""

    method: str = "dfad"
    # --- models -------------------------------------------------------------------------
    # A zoo name (models.MODELS), or hf:<dir or hub id> for a transformers model (integrations/hf_models.py;
    # the same for `student`).
    teacher: str = "digits_cnn"
    # A path (.safetensors, or a torch state dict loaded with weights_only=True), or
    # "pretrained:digits": train on the fixed 70% digits split once and cache it ("pretrained:shapes":
    # the same for the segmentation demo, on the procedural shapes train split).
    # Optional for an hf: teacher (its weights come with it; a file given here is loaded on top).
    teacher_checkpoint: Optional[str] = None
    student: str = "digits_cnn_small"
    student_checkpoint: Optional[str] = None
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 8
    # segmentation: per-pixel logits (N, num_classes, H, W), scored by mIoU (eval/miou) on per-pixel labels
    task: Literal["classification", "segmentation"] = "classification"
    # --- real data, for evaluation only (a DFKD method never trains on it) ---------------
    # digits, mnist, shapes (segmentation), cifar10_jpeg, imagefolder:<folder> or none
    # (evaluation.load_eval_set says which exist).
    eval_dataset: str = "digits"
    data_dir: Optional[str] = None
    # Normalisation of real evaluation images, per channel for pixels in [0, 1]. None: the teacher's own
    # (a transformers image processor's), else the data set's default (evaluation.load_eval_set).
    image_mean: Optional[list[float]] = None
    image_std: Optional[list[float]] = None
    eval_max_samples: Optional[int] = None  # a fixed random subset of the evaluation set (None: all of it)
    eval_steps: int = 100
    per_device_eval_batch_size: int = 512
    # --- the loop -------------------------------------------------------------------------
    output_dir: str = "runs/dfkd"
    overwrite_output_dir: bool = False
    seed: int = 0
    max_steps: int = 1000
    per_device_train_batch_size: int = 256
    gradient_accumulation_steps: int = 1
    # None: whatever the launcher says (`accelerate launch --mixed_precision`, a config file), else "no".
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None
    # Student optimizer (SGD with momentum in every reference script, implementations.md s.3).
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_scheduler: Literal["constant", "multistep", "cosine"] = "constant"
    lr_milestones: list[int] = field(default_factory=list)  # in optimizer steps
    lr_gamma: float = 0.1
    lr_min: float = 0.0  # cosine floor (eta_min)
    max_grad_norm: Optional[float] = None
    # Deliver (evaluate, save) an exponential moving average of the student's weights with this decay,
    # e.g. 0.999; the online student still plays the method's game. Not in any DFKD paper (ema.py). None: off.
    student_ema_decay: Optional[float] = None
    # --- checkpoints, logging ---------------------------------------------------------------
    save_steps: int = 0  # 0: only at the end
    save_total_limit: int = 2
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest"
    logging_steps: int = 10
    report_to: str = "tensorboard"  # an Accelerate tracker name, "all" or "none"
    image_grid_rounds: int = 0  # write a PNG grid of synthetic images every N rounds (0: never)
    progress_bar: bool = True
    write_report: bool = True  # OUTPUT_DIR/report.md with PNG plots at the end (matplotlib, about 1 s)
    num_threads: Optional[int] = None  # torch.set_num_threads per process
    # Teacher and synthesis networks (generators, VAE) in channels_last memory format: a DFAD round
    # on MNIST runs 1.66x faster on CPU (oneDNN convs; `benchmarks/dfad_throughput.py --memory_format
    # both`). The student follows its input's format, and checkpoints are unchanged.
    channels_last: bool = False

    def validate(self) -> None:
        positive = ["max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "num_classes", "in_channels", "image_size", "per_device_eval_batch_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ["eval_steps", "save_steps", "logging_steps", "image_grid_rounds"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 disables it), got {getattr(self, name)}")
        if self.student_ema_decay is not None:
            check_ema_decay(self.student_ema_decay)
        if self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.lr_scheduler == "multistep" and not self.lr_milestones:
            raise ConfigError("lr_scheduler=multistep needs lr_milestones, e.g. --lr_milestones [100,200]")
        if self.teacher_checkpoint is None and not self.teacher.startswith("hf:"):
            raise ConfigError(
                "no teacher_checkpoint: set it to a weights file (.safetensors or a torch state dict), "
                "or to 'pretrained:digits' for the built-in digits teacher")


# ---------------------------------------------------------------------------------------------
# Typed parsing of values coming from YAML or from the command line.


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert `value` to the dataclass field type `tp`, or raise a ConfigError naming the key."""
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if inner in (int, float):
        try:
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
            if inner is int and isinstance(parsed, float) and not parsed.is_integer():
                raise ValueError
            return inner(parsed)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {inner.__name__}, got {value!r}") from None
    if inner is str:
        return str(value)
    return value


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`['--max_steps', '20', '--seed=3']` -> {'max_steps': '20', 'seed': '3'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value (use --{key} true for a flag)")
            value = argv[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def read_recipe(path: Optional[str | Path], overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A flat YAML mapping with command-line overrides applied on top."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist; see recipes/ for examples")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a flat YAML mapping of key: value")
        raw.update(loaded)
    raw.update(overrides or {})
    return raw


def build_configs(raw: dict[str, Any], classes: list[type], context: str = "") -> list[Any]:
    """Split flat keys over dataclasses (the first that has a field takes it), typed and validated.
    An unknown key is an error naming the closest known key."""
    fields = [_fields(cls) for cls in classes]
    known = sorted({name for f in fields for name in f})
    kwargs: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in raw.items():
        for f, kw in zip(fields, kwargs):
            if key in f:
                kw[key] = coerce(key, value, f[key])
                break
        else:
            raise ConfigError(f"unknown key {key!r}{context}." + _did_you_mean(key, known)
                              + " Run `accelerate-dfkd --help-keys` to list every key.")
    configs = [cls(**kw) for cls, kw in zip(classes, kwargs)]
    for cfg in configs:
        if hasattr(cfg, "validate"):
            cfg.validate()
    return configs


def load_recipe(path: Optional[str | Path], overrides: Optional[dict[str, Any]] = None,
                methods: Optional[dict[str, type]] = None) -> tuple[DistillConfig, MethodConfig]:
    """Read a flat YAML recipe, apply overrides, and split it into the loop and method configs."""
    if methods is None:
        from .methods import METHODS as methods  # noqa: N811 (late import: methods import config)
    raw = read_recipe(path, overrides)
    method = str(raw.get("method", DistillConfig.method))
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}; known: {sorted(methods)}." + _did_you_mean(method, list(methods)))
    where = f" in {path}" if path is not None else ""
    config, method_config = build_configs(raw, [DistillConfig, methods[method].config_class],
                                          f"{where} for method {method!r}")
    return config, method_config


def describe_keys(method_cls: type) -> str:
    """A listing of every key a recipe for this method accepts, with its default."""
    lines = []
    for title, cls in (("loop (DistillConfig)", DistillConfig), (f"method ({method_cls.__name__})", method_cls)):
        lines.append(f"{title}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {f.name} = {default!r}")
    return "\n".join(lines)


def flat_dict(*configs: Any) -> dict[str, Any]:
    """Merged fields of several dataclasses, lists turned into strings (tracker-friendly)."""
    out: dict[str, Any] = {}
    for cfg in configs:
        for key, value in dataclasses.asdict(cfg).items():
            out[key] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out
