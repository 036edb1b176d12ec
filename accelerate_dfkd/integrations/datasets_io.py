"""Synthetic sets as HuggingFace `datasets`: export (streamed, flat memory) and import (a source).

Export: `export_synthetic_dataset(synthesizer, student, "runs/synth", num_images=10_000)` draws the
method's images batch by batch and writes them as they come, so memory does not grow with the
number of images: each batch becomes one Arrow record batch, built from the numpy buffers (not
through Python lists, see `_arrow_table`). `format="disk"` streams them into an Arrow file that
`Dataset.from_file` memory-maps and `save_to_disk` writes out (a folder for `load_from_disk`);
`format="parquet"` appends one row group per batch to a single parquet file with a
`pyarrow.parquet.ParquetWriter` (for `Dataset.from_parquet` / `load_dataset("parquet", ...)`).

Columns (one row per image):
    image            uint8 (C, H, W). Each image is min-max quantised on its own range, so it is also
                     a viewable auto-contrast picture.
    image_low, image_high  float32: the range; the teacher's input is
                     pixel_values = image_low + image / 255 * (image_high - image_low)
                     (quantisation error at most (image_high - image_low) / 510 per pixel)
    teacher_logits   float32 (num_classes,)             with teacher_outputs="logits" (the default)
    teacher_topk_indices int64 (k,), teacher_topk_probs float32 (k,)   with teacher_outputs="topk"
                     (softmax at T = 1 of the teacher's logits, largest first)
    teacher_label    int64: the teacher's argmax
    aimed_class      int64: the class the synthesizer aimed the image at, only when the method
                     reports one (a `targets` tensor on its batches or on its SynthesisOutput)
The dataset's description (disk: dataset_info.json; parquet: schema metadata `accelerate_dfkd`)
holds a JSON record of the method, image shape, class count and image encoding.

What gets drawn (`mode`):
    "source"  batches of the method's read side (`build_source`), the images a student would read:
              the generator methods. A synthesis round against `student` runs before every
              `synthesize_every`-th batch (0: never, e.g. a generator trained by a distillation run).
    "rounds"  the images each synthesis round produces (`synthesize(student).images`): methods whose
              source re-reads a pool with replacement and augmentation (DeepInversion), where the
              source would export duplicates.
    "auto"    "source" for generator methods (GenerativeSynthesizer), "rounds" otherwise.
The student is never trained here. Adversarial terms play against the `student` given: export
after a distillation run (the CLI's `--from_checkpoint` loads its synthesizer and its student) to
get the data of a finished game; a fresh student makes the adversarial term noise.

Import: `DatasetSource(path, batch_size, rng)` reads an export back as a SyntheticSource of
`SyntheticBatch`es (shuffled epochs, resumable), e.g. for method-free KD on an exported set with the
Distiller (`method: exported_dataset`, `dataset_path: PATH`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..synthesis import SyntheticBatch, SyntheticSource, Synthesizer
from ..utils import logits_of

FORMAT_VERSION = 1
METADATA_KEY = "accelerate_dfkd"


# --- encoding -----------------------------------------------------------------------------------
def quantize_images(images: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float images (N, C, H, W) -> uint8 images and each image's float32 (low, high) range."""
    flat = images.detach().float().flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low).clamp_min(1e-12)  # a constant image encodes as all zeros
    scaled = (images.detach().float() - low.view(-1, 1, 1, 1)) / span.view(-1, 1, 1, 1)
    codes = torch.round(scaled * 255).clamp_(0, 255).to(torch.uint8)
    return codes.cpu().numpy(), low.cpu().numpy().astype(np.float32), high.cpu().numpy().astype(np.float32)


def dequantize_images(codes: np.ndarray, low: np.ndarray, high: np.ndarray) -> Tensor:
    """The inverse of `quantize_images`, as a float32 tensor in the teacher's input space."""
    codes_t = torch.from_numpy(np.ascontiguousarray(codes)).float()
    low_t = torch.from_numpy(np.asarray(low, dtype=np.float32)).view(-1, 1, 1, 1)
    high_t = torch.from_numpy(np.asarray(high, dtype=np.float32)).view(-1, 1, 1, 1)
    return low_t + codes_t / 255.0 * (high_t - low_t)


def _features(image_shape: tuple[int, int, int], num_classes: int, teacher_outputs: str, top_k: int,
              with_aimed_class: bool):
    from datasets import Array3D, Features, List, Value

    columns: dict[str, Any] = {
        "image": Array3D(shape=tuple(image_shape), dtype="uint8"),
        "image_low": Value("float32"),
        "image_high": Value("float32"),
    }
    if teacher_outputs == "logits":
        columns["teacher_logits"] = List(Value("float32"), length=num_classes)
    else:
        columns["teacher_topk_indices"] = List(Value("int64"), length=top_k)
        columns["teacher_topk_probs"] = List(Value("float32"), length=top_k)
    columns["teacher_label"] = Value("int64")
    if with_aimed_class:
        columns["aimed_class"] = Value("int64")
    return Features(columns)


def _arrow_table(chunk: dict[str, np.ndarray], features):
    """A chunk of numpy columns -> a pyarrow Table of `features`' schema, built from the numpy
    buffers directly. (`datasets` encodes Array3D examples through Python lists: about 100 MB of
    Python objects for a 1000-row writer batch of 3x32x32 images, which `Dataset.from_generator`
    and `Dataset.from_dict` would add to the export's peak memory.)"""
    import pyarrow as pa

    schema = features.arrow_schema
    columns = []
    for name in features:
        values = np.ascontiguousarray(chunk[name])
        if name == "image":  # Array3D: an extension type over list<list<list<uint8>>>
            n, c, h, w = values.shape
            storage = pa.array(values.reshape(-1))
            for step, count in ((w, n * c * h), (h, n * c), (c, n)):
                storage = pa.ListArray.from_arrays(pa.array(np.arange(0, count * step + 1, step, dtype=np.int32)),
                                                   storage)
            columns.append(pa.ExtensionArray.from_storage(schema.field(name).type, storage))
        elif values.ndim == 2:  # fixed-length lists (teacher logits, top-k)
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
        else:
            columns.append(pa.array(values))
    return pa.Table.from_arrays(columns, schema=schema)


# --- export ---------------------------------------------------------------------------------------
def _resolve_mode(synthesizer: Synthesizer, mode: str) -> str:
    from ..synthesis.generative import GenerativeSynthesizer

    if mode == "auto":
        return "source" if isinstance(synthesizer, GenerativeSynthesizer) else "rounds"
    if mode not in ("source", "rounds"):
        raise ConfigError(f"mode must be 'auto', 'source' or 'rounds', got {mode!r}")
    return mode


def _image_batches(synthesizer: Synthesizer, student: Optional[nn.Module], mode: str, batch_size: int,
                   synthesize_every: int, warmup_rounds: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
    """Endless (images, aimed classes or None) batches drawn as `mode` says."""
    for _ in range(warmup_rounds):
        synthesizer.synthesize(student)
    if mode == "rounds":
        while True:
            output = synthesizer.synthesize(student)
            if output.images is None:
                raise ConfigError(f"{type(synthesizer).__name__}.synthesize() returns no images: export it with "
                                  "mode='source'")
            yield output.images, output.targets
    source = synthesizer.build_source(batch_size)
    drawn = 0
    while True:
        if synthesize_every and drawn % synthesize_every == 0:
            synthesizer.synthesize(student)
        batch = source.next_batch()
        drawn += 1
        yield batch.images, batch.targets


def synthetic_chunks(synthesizer: Synthesizer, student: Optional[nn.Module], num_images: int, *,
                     batch_size: int = 256, mode: Literal["auto", "source", "rounds"] = "auto",
                     synthesize_every: int = 0, warmup_rounds: int = 0,
                     teacher_outputs: Literal["logits", "topk"] = "logits", top_k: int = 5,
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Columnar numpy chunks (one per drawn batch, the last one trimmed) totalling `num_images` rows."""
    if num_images <= 0 or batch_size <= 0:
        raise ConfigError(f"num_images and batch_size must be positive, got {num_images} and {batch_size}")
    if synthesize_every < 0 or warmup_rounds < 0:
        raise ConfigError("synthesize_every and warmup_rounds must be >= 0")
    if teacher_outputs not in ("logits", "topk"):
        raise ConfigError(f"teacher_outputs must be 'logits' or 'topk', got {teacher_outputs!r}")
    if teacher_outputs == "topk" and not 0 < top_k <= synthesizer.num_classes:
        raise ConfigError(f"top_k must be in 1..{synthesizer.num_classes}, got {top_k}")
    mode = _resolve_mode(synthesizer, mode)
    teacher = synthesizer.teacher
    written = 0
    for images, aimed in _image_batches(synthesizer, student, mode, batch_size, synthesize_every, warmup_rounds):
        images = images[: num_images - written].detach()
        with torch.no_grad(), synthesizer.context.autocast():
            logits = logits_of(teacher(images)).float()
        codes, low, high = quantize_images(images)
        chunk: dict[str, np.ndarray] = {"image": codes, "image_low": low, "image_high": high}
        if teacher_outputs == "logits":
            chunk["teacher_logits"] = logits.cpu().numpy()
        else:
            probs, indices = torch.softmax(logits, dim=1).topk(top_k, dim=1)
            chunk["teacher_topk_indices"] = indices.cpu().numpy()
            chunk["teacher_topk_probs"] = probs.cpu().numpy()
        chunk["teacher_label"] = logits.argmax(dim=1).cpu().numpy()
        if aimed is not None:
            chunk["aimed_class"] = aimed[: len(images)].cpu().numpy().astype(np.int64)
        yield chunk
        written += len(images)
        if written >= num_images:
            return


def _chain(first: dict[str, np.ndarray], rest: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    yield first
    yield from rest



def export_synthetic_dataset(synthesizer: Synthesizer, student: Optional[nn.Module], path: str | Path, *,
                             num_images: int, format: Literal["disk", "parquet"] = "disk",
                             batch_size: int = 256, mode: Literal["auto", "source", "rounds"] = "auto",
                             synthesize_every: int = 0, warmup_rounds: int = 0,
                             teacher_outputs: Literal["logits", "topk"] = "logits", top_k: int = 5,
                             overwrite: bool = False,
                             metadata: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write `num_images` synthetic images with their teacher outputs to `path` and return the
    metadata record. Memory stays flat: one batch is in flight at a time (module docstring)."""
    if format not in ("disk", "parquet"):
        raise ConfigError(f"format must be 'disk' or 'parquet', got {format!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite=True (--overwrite true) or choose another output")
    chunks = synthetic_chunks(synthesizer, student, num_images, batch_size=batch_size, mode=mode,
                              synthesize_every=synthesize_every, warmup_rounds=warmup_rounds,
                              teacher_outputs=teacher_outputs, top_k=top_k)
    first = next(chunks)  # the schema depends on whether the method reports aimed classes
    features = _features(synthesizer.image_shape, synthesizer.num_classes, teacher_outputs, top_k,
                         with_aimed_class="aimed_class" in first)
    record = {"format_version": FORMAT_VERSION, "method": getattr(synthesizer, "name", type(synthesizer).__name__),
              "image_shape": list(synthesizer.image_shape), "num_classes": synthesizer.num_classes,
              "num_images": num_images, "teacher_outputs": teacher_outputs,
              "top_k": top_k if teacher_outputs == "topk" else None,
              "image_encoding": "uint8 per-image min-max: image_low + image / 255 * (image_high - image_low)",
              "mode": _resolve_mode(synthesizer, mode), **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "parquet":
        _write_parquet(path, features, first, chunks, record, overwrite)
    else:
        _write_disk(path, features, first, chunks, record, overwrite)
    return record


def _write_parquet(path: Path, features, first, chunks, record: dict, overwrite: bool) -> None:
    import pyarrow.parquet as pq

    schema = features.arrow_schema  # carries the `huggingface` features metadata
    schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY.encode(): json.dumps(record).encode()})
    # Written beside the target and renamed into place, so `path` never holds half an export.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for chunk in _chain(first, chunks):  # one row group per batch
                writer.write_table(_arrow_table(chunk, features).replace_schema_metadata(schema.metadata))
        if overwrite and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_disk(path: Path, features, first, chunks, record: dict, overwrite: bool) -> None:
    """Record batches streamed into one Arrow file (the format `datasets` memory-maps), opened with
    `Dataset.from_file` and written out with `save_to_disk`; the finished folder is renamed into
    place, so `path` never holds half an export."""
    import pyarrow as pa
    from datasets import Dataset

    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.stream-", dir=path.parent) as staging:
            stream = Path(staging) / "data.arrow"
            with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, features.arrow_schema) as writer:
                for chunk in _chain(first, chunks):
                    writer.write_table(_arrow_table(chunk, features))
            dataset = Dataset.from_file(str(stream))
            dataset.info.description = json.dumps(record)
            dataset.save_to_disk(str(tmp))
            del dataset
        if overwrite and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        tmp.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- import ---------------------------------------------------------------------------------------
def load_synthetic_dataset(path: str | Path):
    """An export as a `datasets.Dataset` (memory-mapped for `disk`), and its metadata record."""
    from datasets import Dataset, load_from_disk
    from datasets.table import InMemoryTable

    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file():
            raise ConfigError(f"{path} is not a dataset written by save_to_disk (no dataset_info.json)")
        dataset = load_from_disk(str(path))
        description = dataset.info.description or ""
    elif path.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(str(path))
        metadata = table.schema.metadata or {}
        description = metadata.get(METADATA_KEY.encode(), b"").decode()
        dataset = Dataset(InMemoryTable(table))  # features from the schema's `huggingface` metadata
    else:
        raise ConfigError(f"no synthetic dataset at {path}: give the folder of a `disk` export or a .parquet file")
    try:
        record = json.loads(description)
    except json.JSONDecodeError:
        record = {}
    if "image" not in dataset.column_names or "image_low" not in dataset.column_names:
        raise ConfigError(f"{path} is not an accelerate_dfkd export (columns {dataset.column_names}); "
                          "write one with `accelerate-dfkd synthesize`")
    return dataset, record


class DatasetSource(SyntheticSource):
    """An exported synthetic set read back as SyntheticBatches: shuffled epochs from its own
    generator (position in the epoch is state, so a resumed run continues mid-epoch), images
    dequantised to float32 in the teacher's input space, `aimed_class` as `targets` when present.
    Reads in slices of `batch_size` rows (environment.md section 5: item-by-item access is 10x slower).
    """

    def __init__(self, path: str | Path, batch_size: int, rng: torch.Generator,
                 device: torch.device | str = "cpu", shuffle: bool = True) -> None:
        dataset, self.record = load_synthetic_dataset(path)
        self.path = Path(path)
        columns = [c for c in ("image", "image_low", "image_high", "aimed_class") if c in dataset.column_names]
        self.dataset = dataset.select_columns(columns).with_format("numpy")
        if len(self.dataset) < batch_size:
            raise ConfigError(f"{path} holds {len(self.dataset)} images, fewer than one batch of {batch_size}")
        self.batch_size, self.rng, self.shuffle = batch_size, rng, shuffle
        self.device = torch.device(device)
        self.order: Optional[Tensor] = None
        self.position = 0

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.features["image"].shape)

    def next_batch(self) -> SyntheticBatch:
        if self.order is None or self.position + self.batch_size > len(self.order):
            n = len(self.dataset)
            self.order = (torch.randperm(n, generator=self.rng, device=self.rng.device).cpu() if self.shuffle
                          else torch.arange(n))
            self.position = 0
        idx = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        rows = self.dataset[idx.tolist()]
        images = dequantize_images(rows["image"], rows["image_low"], rows["image_high"]).to(self.device)
        targets = torch.from_numpy(rows["aimed_class"]).to(self.device) if "aimed_class" in rows else None
        return SyntheticBatch(images=images, targets=targets)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.order, self.position = state["order"], state["position"]


# --- `accelerate-dfkd synthesize RECIPE --num_images N --output PATH --format disk|parquet` ---------
@dataclass
class ExportConfig:
    """Keys of `accelerate-dfkd synthesize`, next to the recipe's own (which pick the method, the
    teacher, the student, the image shape, the seed and the batch size: per_device_train_batch_size)."""

    num_images: int = 10_000
    output: Optional[str] = None          # a folder (format=disk) or a .parquet file
    format: Literal["disk", "parquet"] = "disk"
    # A checkpoint of a distillation run with this recipe (a step_* folder, the run's output_dir, or
    # "latest" for the recipe's output_dir): its synthesizer state (generator, pool, latents) and its
    # student are loaded, so the export continues the finished game. Without one: a fresh synthesizer
    # and the recipe's student (student_checkpoint, or freshly initialised from the seed).
    from_checkpoint: Optional[str] = None
    export_mode: Literal["auto", "source", "rounds"] = "auto"
    # Synthesis rounds in "source" mode: one before every N-th exported batch. None: 0 (the trained
    # generator as it is) with from_checkpoint, else 1 (the method keeps synthesizing while exporting).
    synthesize_every: Optional[int] = None
    teacher_outputs: Literal["logits", "topk"] = "logits"
    top_k: int = 5
    overwrite: bool = False

    def validate(self) -> None:
        if self.output is None:
            raise ConfigError("synthesize needs --output PATH (a folder for --format disk, a .parquet file for "
                              "--format parquet)")
        if self.num_images <= 0:
            raise ConfigError(f"num_images must be positive, got {self.num_images}")
        if self.format == "parquet" and not self.output.endswith(".parquet"):
            raise ConfigError(f"--format parquet writes one file: give --output a .parquet path, got {self.output!r}")
        if self.synthesize_every is not None and self.synthesize_every < 0:
            raise ConfigError(f"synthesize_every must be >= 0, got {self.synthesize_every}")


def synthesize_command(recipe: Optional[str], overrides: dict[str, str]) -> dict[str, Any]:
    """The CLI command: build the recipe's models and synthesizer, optionally restore a
    distillation checkpoint, export. Single process."""
    import time

    from ..checkpointing import rank_file, resolve_resume
    from ..config import DistillConfig, build_configs, read_recipe
    from ..evaluation import recipe_input_normalization
    from ..methods import METHODS
    from ..models import load_checkpoint_into
    from ..teachers import load_student, load_teacher
    from .trainer import build_synthesizer

    raw = read_recipe(recipe, overrides)
    method = str(raw.get("method", DistillConfig.method))
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    export, config, method_config = build_configs(
        raw, [ExportConfig, DistillConfig, METHODS[method].config_class],
        f"{' in ' + recipe if recipe else ''} for `synthesize` with method {method!r}")
    if Path(export.output).exists() and not export.overwrite:
        raise ConfigError(f"{export.output} exists; pass --overwrite true or choose another --output")
    checkpoint = None
    if export.from_checkpoint:
        checkpoint = resolve_resume(export.from_checkpoint, Path(config.output_dir))
        if checkpoint is None:
            raise ConfigError(f"--from_checkpoint latest: no checkpoint in {config.output_dir}/checkpoints; "
                              "give the run's --output_dir or a checkpoint folder")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    shape = dict(num_classes=config.num_classes, in_channels=config.in_channels, image_size=config.image_size,
                 task=config.task)
    image_shape = (config.in_channels, config.image_size, config.image_size)
    teacher = load_teacher(config.teacher, config.teacher_checkpoint, **shape)
    torch.manual_seed(config.seed)
    student = load_student(config.student, config.student_checkpoint, **shape)
    mean, std = recipe_input_normalization(config, teacher) or (None, None)  # as the Distiller would resolve it
    synthesizer = build_synthesizer(method_config, teacher, image_shape=image_shape, num_classes=config.num_classes,
                                    seed=config.seed, task=config.task, image_mean=mean, image_std=std)
    if checkpoint is not None:
        if not rank_file(checkpoint, 0).is_file() or not (checkpoint / "model.safetensors").is_file():
            raise ConfigError(f"{checkpoint} lacks rank_0.pt or model.safetensors: not a distillation checkpoint")
        state = torch.load(rank_file(checkpoint, 0), map_location="cpu", weights_only=True)
        try:
            synthesizer.load_state_dict(state["synthesizer"])
            load_checkpoint_into(student, checkpoint / "model.safetensors", what="student")
        except (KeyError, RuntimeError, ValueError) as err:
            raise ConfigError(f"{checkpoint} does not match recipe {recipe} (method {method}, student "
                              f"{config.student}): {err}") from None
    every = export.synthesize_every if export.synthesize_every is not None else (0 if checkpoint else 1)
    # The method's warm-up rounds (FastDFKD) run before the first image, unless the checkpoint's run
    # is past them already.
    warmup = 0 if checkpoint else getattr(method_config, "warmup_rounds", 0)
    start = time.perf_counter()
    record = export_synthetic_dataset(
        synthesizer, student, export.output, num_images=export.num_images, format=export.format,
        batch_size=config.per_device_train_batch_size, mode=export.export_mode, synthesize_every=every,
        warmup_rounds=warmup, teacher_outputs=export.teacher_outputs, top_k=export.top_k,
        overwrite=export.overwrite,
        metadata={"recipe": recipe, "teacher": config.teacher, "teacher_checkpoint": config.teacher_checkpoint,
                  "student": config.student, "from_checkpoint": str(checkpoint) if checkpoint else None,
                  "seed": config.seed, "synthesize_every": every, "warmup_rounds": warmup})
    print(f"synthesize: {export.num_images} images of method {method} ({record['mode']} mode) -> {export.output} "
          f"({export.format}) in {time.perf_counter() - start:.1f} s", flush=True)
    return record
