"""transformers vision models as teachers or students.

A recipe names one with the prefix `hf:` (`teacher: hf:/path/to/dir`, `student: hf:org/name`): the
rest is anything `from_pretrained` accepts, a local directory written by `save_pretrained` or a Hub
id. Offline (`HF_HUB_OFFLINE=1`, or no network) a Hub id loads only from the local Hub cache.
`AutoModelForImageClassification` is used for `task: classification`, `AutoModelForSemanticSegmentation`
for `task: segmentation`. `teacher_checkpoint` / `student_checkpoint`, when given, are state-dict
files loaded strictly on top (e.g. a `student.safetensors` of an earlier run).

What the wrapper (`HFImageModel`) settles, so the rest of the library sees a plain classifier:

* **Outputs.** `forward(images)` returns the logits tensor (`ModelOutput.logits`). Segmentation
  logits, which transformers models give at a reduced resolution (Segformer: 1/4), are resized
  bilinearly to the input's height and width, so they line up with per-pixel labels.
* **Input space.** Like every model of this library, the wrapper takes images in the model's
  *normalised* input space, i.e. what a transformers image processor hands over as `pixel_values`
  (transformers models never normalise inside). Synthetic images are made in that space directly
  (generators with `output_space = "normalized"`, DeepInversion's pixels). The normalisation itself
  (`image_mean` / `image_std` of `preprocessor_config.json`, re-expressed for pixels in [0, 1]) is
  exposed as `model.image_mean` / `model.image_std`: the CLI uses the teacher's to normalise the
  real evaluation images, so teacher, student and evaluation all share the teacher's input space.
  A student's own image processor is not used: it learns in the teacher's space.
* **Resolution.** `native_size` is the resolution the model was trained at: the image processor's
  `crop_size` (when it centre-crops) or `size`, else the config's `image_size`, else none (any size).
  Inputs of another size are resized bilinearly (differentiably, so synthesis gradients flow
  through it) before the forward pass; ViTs need that, convolutional models get the scale they saw.
* **BatchNorm.** The wrapped modules are the transformers ones, so `hooks.has_batchnorm` and
  `BatchNormStatistics` find the `nn.BatchNorm2d` layers of ResNet, RegNet or MobileNetV2; a
  teacher without them (ViT, ConvNeXt, Swin) is refused by BN-statistics methods (deepinversion,
  dfq with bn_weight > 0) with a ConfigError, and works with dfad, dafl and zskt.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..utils import logits_of

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
PREPROCESSOR_FILE = "preprocessor_config.json"
# Weight files from_pretrained looks for in a directory (transformers' SAFE_WEIGHTS_NAME & co.).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")

Task = Literal["classification", "segmentation"]


def is_hf_spec(name: Optional[str]) -> bool:
    """Whether a `teacher` / `student` value names a transformers model (`hf:<dir or hub id>`)."""
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def hf_source(spec: str) -> str:
    """`hf:<source>` -> `<source>`, with a clear error when nothing follows the prefix."""
    source = spec[len(HF_PREFIX):] if is_hf_spec(spec) else spec
    if not source:
        raise ConfigError(f"{spec!r} names no model: write hf:/path/to/saved_dir or hf:org/name")
    return source


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # an optional dependency: the `hf` extra
        raise ConfigError("hf: models need the transformers package: pip install 'accelerate_dfkd[hf]' "
                          f"(import failed: {err})") from None
    return transformers


# --- what the image processor says -----------------------------------------------------------------
def read_preprocessor_config(source: str) -> dict[str, Any]:
    """The model's `preprocessor_config.json` as a dict, {} when it has none. A local directory is
    read directly; a Hub id through transformers' file resolution (the local cache when offline)."""
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / PREPROCESSOR_FILE
        return json.loads(file.read_text()) if file.is_file() else {}
    from transformers.utils import cached_file

    try:
        resolved = cached_file(source, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return {}
    return json.loads(Path(resolved).read_text()) if resolved else {}


def _size_of(value: Any) -> Optional[tuple[int, int]]:
    """An image-processor size entry ({"height", "width"}, {"shortest_edge"}, an int) as (H, W)."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        # shortest_edge: the processor resizes the short side (and usually centre-crops a square)
        edge = value.get("shortest_edge") or value.get("longest_edge")
        if edge:
            return (int(edge), int(edge))
    return None


def native_size_of(config: Any, preprocessor: dict[str, Any]) -> Optional[tuple[int, int]]:
    """The resolution the model was trained at; None when neither the processor nor the config says."""
    if preprocessor.get("do_center_crop") and _size_of(preprocessor.get("crop_size")):
        return _size_of(preprocessor["crop_size"])
    if preprocessor.get("do_resize", True) and _size_of(preprocessor.get("size")):
        return _size_of(preprocessor["size"])
    return _size_of(getattr(config, "image_size", None))


Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel


def pixel_normalization(preprocessor: dict[str, Any], channels: int) -> Optional[Normalization]:
    """(mean, std) such that the model's input is (pixels - mean) / std for pixels in [0, 1].

    An image processor computes (p * 255 * rescale_factor - image_mean) / image_std from uint8
    pixels p * 255 (rescale_factor is 1/255 almost always, and 1 when do_rescale is false), i.e.
    mean = image_mean / s and std = image_std / s with s = 255 * rescale_factor. Without
    do_normalize the mean is 0 and the std 1 / s. None when the processor gives no normalisation.
    """
    if not preprocessor:
        return None
    rescale = float(preprocessor.get("rescale_factor", 1 / 255)) if preprocessor.get("do_rescale", True) else 1.0
    scale = 255.0 * rescale
    if preprocessor.get("do_normalize", True):
        mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
        if mean is None or std is None:
            return None
        mean = [float(mean)] if isinstance(mean, (int, float)) else [float(v) for v in mean]
        std = [float(std)] if isinstance(std, (int, float)) else [float(v) for v in std]
    else:
        mean, std = [0.0], [1.0]
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"the image processor normalises {len(mean)} channels but the model takes {channels}: "
                          f"fix image_mean / image_std in {PREPROCESSOR_FILE}")
    return tuple(m / scale for m in mean), tuple(s / scale for s in std)


# --- the wrapper -----------------------------------------------------------------------------------
class HFImageModel(nn.Module):
    """A transformers vision model that takes normalised images and returns a logits tensor.

    `model` is the transformers model (its parameters and modules, BatchNorm included, are this
    module's); `native_size` (H, W) or None; `image_mean` / `image_std` the input normalisation for
    pixels in [0, 1] (None when unknown); `source` where it came from (for messages).
    """

    def __init__(self, model: nn.Module, *, task: Task = "classification",
                 native_size: Optional[tuple[int, int]] = None,
                 image_mean: Optional[tuple[float, ...]] = None, image_std: Optional[tuple[float, ...]] = None,
                 source: str = "") -> None:
        super().__init__()
        if task not in ("classification", "segmentation"):
            raise ConfigError(f"task must be classification or segmentation, got {task!r}")
        self.model = model
        self.task = task
        self.native_size = tuple(native_size) if native_size is not None else None
        self.image_mean = image_mean
        self.image_std = image_std
        self.source = source

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, images: Tensor) -> Tensor:
        size = tuple(images.shape[-2:])
        if self.native_size is not None and size != self.native_size:
            shrinking = self.native_size[0] < size[0] or self.native_size[1] < size[1]
            images = F.interpolate(images, size=self.native_size, mode="bilinear", align_corners=False,
                                   antialias=shrinking)
        logits = logits_of(self.model(pixel_values=images))
        if self.task == "segmentation" and tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def save_pretrained(self, path: str | Path, *, image_mean: Optional[tuple[float, ...]] = None,
                        image_std: Optional[tuple[float, ...]] = None,
                        image_size: Optional[int] = None) -> Path:
        """`save_pretrained` of the transformers model plus a `preprocessor_config.json` that
        reproduces this model's input pipeline: resize to `native_size` (else `image_size`),
        rescale to [0, 1], normalise with `image_mean` / `image_std` (default: this model's own).
        `AutoModelFor...from_pretrained(path)` then loads it with no reference to this library."""
        path = Path(path)
        self.model.save_pretrained(str(path))
        mean = image_mean if image_mean is not None else self.image_mean
        std = image_std if image_std is not None else self.image_std
        height, width = self.native_size or (image_size, image_size)
        if mean is not None and std is not None and height:
            processor = {
                # ViTImageProcessor does exactly resize -> rescale -> normalise, nothing else.
                "image_processor_type": "ViTImageProcessor",
                "do_resize": True, "size": {"height": int(height), "width": int(width)}, "resample": 2,
                "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [float(v) for v in mean], "image_std": [float(v) for v in std],
            }
            (path / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
        return path


# --- loading ---------------------------------------------------------------------------------------
def _has_local_weights(source: str) -> Optional[bool]:
    """True/False for a local directory, None for a Hub id (its weights are the Hub's business)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    return any((path / name).is_file() for name in _WEIGHT_FILES)


def _load_config(source: str, role: str) -> Any:
    transformers = _import_transformers()
    path = Path(source).expanduser()
    if (source.startswith((".", "/", "~")) or path.exists()) and not (path / "config.json").is_file():
        raise ConfigError(f"{role} hf:{source}: no config.json in {path}; give a directory written by "
                          "save_pretrained, or a Hub id (org/name)")
    try:
        return transformers.AutoConfig.from_pretrained(str(path) if path.is_dir() else source)
    except OSError as err:
        raise ConfigError(
            f"cannot load the {role} hf:{source}: {str(err).splitlines()[0]} Offline (HF_HUB_OFFLINE=1, or no "
            "network) a Hub id loads only from the local Hub cache; otherwise save the model with "
            "save_pretrained and give its directory") from None
    except ValueError as err:
        raise ConfigError(f"cannot read the {role} config hf:{source}: {str(err).splitlines()[0]}") from None


def load_hf_model(spec: str, *, role: Literal["teacher", "student"], num_classes: int, in_channels: int,
                  task: Task = "classification", checkpoint: Optional[str] = None,
                  native_size: Optional[tuple[int, int]] | Literal["auto"] = "auto") -> HFImageModel:
    """Load `hf:<dir or hub id>` as an HFImageModel (float32, on CPU).

    A teacher must have weights and exactly `num_classes` outputs. A student may come from a
    directory holding only `config.json` (random initialisation, seeded by the caller's torch seed),
    and a pretrained student with another number of labels gets a freshly initialised head.
    `native_size="auto"` reads the model's training resolution (module docstring); None disables
    resizing; an (H, W) pair forces one.
    """
    transformers = _import_transformers()
    source = hf_source(spec)
    if checkpoint and checkpoint.startswith("pretrained:"):
        raise ConfigError(f"{role}_checkpoint {checkpoint} is for a zoo model; an hf: {role} brings its own weights: "
                          f"set --{role}_checkpoint none (or a state-dict file to load on top)")
    config = _load_config(source, role)
    channels = getattr(config, "num_channels", None)
    if channels is not None and channels != in_channels:
        raise ConfigError(f"the {role} hf:{source} takes {channels}-channel images (config num_channels) but "
                          f"in_channels={in_channels}: set --in_channels {channels}, or use a model configured "
                          f"with num_channels={in_channels}")
    auto = (transformers.AutoModelForImageClassification if task == "classification"
            else transformers.AutoModelForSemanticSegmentation)
    labels = getattr(config, "num_labels", None)
    local_weights = _has_local_weights(source)
    load_kwargs: dict[str, Any] = {"dtype": torch.float32}
    if role == "student" and labels != num_classes:
        logger.warning(f"student hf:{source} has {labels} labels; its head is re-initialised for {num_classes}")
        config.num_labels = num_classes  # also rebuilds id2label / label2id
        load_kwargs.update(config=config, ignore_mismatched_sizes=True)
    if local_weights is False and role == "teacher":
        raise ConfigError(f"the teacher hf:{source} has a config but no weights (none of {list(_WEIGHT_FILES)}): "
                          "a teacher must be trained; save it with save_pretrained")
    try:
        if local_weights is False:
            model = auto.from_config(config)  # a student built from its config, randomly initialised
        else:
            model = auto.from_pretrained(str(Path(source).expanduser()) if local_weights else source, **load_kwargs)
    except ValueError as err:  # "Unrecognized configuration class ... for this kind of AutoModel"
        kind = "image classification" if task == "classification" else "semantic segmentation"
        raise ConfigError(f"the {role} hf:{source} ({type(config).__name__}) is not a transformers {kind} "
                          f"model: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise ConfigError(f"cannot load the {role} weights hf:{source}: {str(err).splitlines()[0]}") from None
    if role == "teacher" and labels != num_classes:  # checked once the model kind is known to be right
        raise ConfigError(f"the teacher hf:{source} has {labels} labels (config num_labels) but num_classes="
                          f"{num_classes}: a teacher's classifier must match; set --num_classes {labels}")
    model = model.float()
    preprocessor = read_preprocessor_config(source)
    normalization = pixel_normalization(preprocessor, in_channels)
    size = native_size_of(config, preprocessor) if native_size == "auto" else native_size
    wrapped = HFImageModel(model, task=task, native_size=size, source=source,
                           image_mean=normalization[0] if normalization else None,
                           image_std=normalization[1] if normalization else None)
    if checkpoint:
        load_state_dict_into(wrapped, checkpoint, what=role)
    return wrapped


def load_state_dict_into(model: HFImageModel, checkpoint: str, *, what: str) -> None:
    """A state-dict file into the wrapper: keys as this library saves them (`model.` + the
    transformers names, e.g. student.safetensors) or the transformers model's own names."""
    from ..models import load_checkpoint_into, load_state_dict_file

    try:
        state = load_state_dict_file(checkpoint)
        # whichever naming matches more keys; the strict load then reports what does not match
        target = max((model, model.model), key=lambda m: len(set(state) & set(m.state_dict())))
        load_checkpoint_into(target, state, what=what)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
