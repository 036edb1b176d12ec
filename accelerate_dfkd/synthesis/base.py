"""The write side of a method: a `Synthesizer` owns its generator / latents / pixels, their
optimizers and its synthesis loss terms, and runs one synthesis round per `synthesize()` call."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import losses
from ..config import ConfigError, MethodConfig


@dataclass
class SyntheticBatch:
    """One batch a student learns from. `weights` are per-sample loss weights (importance
    sampling); `indices` point back into a replay buffer; `targets` are real labels (KD-ORI)."""

    images: Tensor
    weights: Optional[Tensor] = None
    indices: Optional[Tensor] = None
    targets: Optional[Tensor] = None

    def to(self, device: torch.device) -> "SyntheticBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SyntheticBatch(move(self.images), move(self.weights), move(self.indices), move(self.targets))

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class SynthesisOutput:
    """What one round produced: detached loss terms (tensors, so no device sync in the loop) and
    the last synthesized images, for image grids and callbacks."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    images: Optional[Tensor] = None
    # The class each image was aimed at, for methods that aim (DeepInversion, CMI, FastDFKD: the
    # cross-entropy target); `accelerate-dfkd synthesize` exports it as `aimed_class`.
    targets: Optional[Tensor] = None


@dataclass
class SynthesisContext:
    """Where and how a synthesizer runs: device, rank, precision. Built from an Accelerator by the
    Distiller, or by hand (`SynthesisContext()`) for a plain PyTorch loop."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    process_index: int = 0
    num_processes: int = 1
    seed: int = 0
    mixed_precision: str = "no"
    # The run's output folder (the Accelerator's project_dir), where disk-backed state such as a
    # replay bank (`replay_storage: disk`) lives by default; None outside a Distiller run.
    output_dir: Optional[str] = None
    # The teacher's input normalisation, per channel (or one value for all) for pixels in [0, 1]:
    # teacher input = (pixels - image_mean) / image_std. Methods with a [0, 1] (sigmoid) generator
    # apply it before the teacher; DeepInversion derives its pixel clamp range from it. The Distiller
    # fills it (evaluation.resolve_input_normalization); set it by hand in a plain PyTorch loop.
    # None: unknown.
    image_mean: Optional[Sequence[float]] = None
    image_std: Optional[Sequence[float]] = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.device.type == "cpu":  # Accelerate's MULTI_CPU device is "cpu:0"; storages tagged so don't reload
            self.device = torch.device("cpu")
        if (self.image_mean is None) != (self.image_std is None):
            raise ConfigError("image_mean and image_std go together: give both (per channel, for pixels in [0, 1]) "
                              "or neither")
        if self.image_mean is not None:
            self.image_mean = tuple(float(v) for v in self.image_mean)
            self.image_std = tuple(float(v) for v in self.image_std)
            if not self.image_mean or len(self.image_mean) != len(self.image_std):
                raise ConfigError(f"image_mean and image_std need one value per channel each, got "
                                  f"{list(self.image_mean)} and {list(self.image_std)}")
            if any(s <= 0 for s in self.image_std):
                raise ConfigError(f"image_std values must be positive, got {list(self.image_std)}")

    @classmethod
    def from_accelerator(cls, accelerator: Any, seed: int, *, image_mean: Optional[Sequence[float]] = None,
                         image_std: Optional[Sequence[float]] = None) -> "SynthesisContext":
        return cls(device=accelerator.device, process_index=accelerator.process_index,
                   num_processes=accelerator.num_processes, seed=seed,
                   mixed_precision=str(accelerator.mixed_precision),
                   output_dir=getattr(accelerator, "project_dir", None), image_mean=image_mean, image_std=image_std)

    def normalization(self, channels: int, *, required_by: Optional[str] = None) -> Optional[tuple[Tensor, Tensor]]:
        """(mean, std) of the teacher's input normalisation as float32 (1, channels, 1, 1) tensors on this
        device, or None when unknown; with `required_by` (who needs it) unknown is a ConfigError."""
        if self.image_mean is None:
            if required_by is None:
                return None
            raise ConfigError(
                f"{required_by} makes [0, 1] images and needs the teacher's input normalisation, which is not "
                "known here: set image_mean and image_std in the recipe (per channel, for pixels in [0, 1]; e.g. "
                "digits [0.3056] / [0.3761], zju-vipa CIFAR-10 [0.4914, 0.4822, 0.4465] / [0.2023, 0.1994, "
                "0.2010]), or fill SynthesisContext(image_mean=..., image_std=...) in a plain PyTorch loop")
        if len(self.image_mean) not in (1, channels):
            raise ConfigError(f"image_mean / image_std have {len(self.image_mean)} values, the images {channels} "
                              "channel(s): give one value per channel (or one for all)")
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.image_mean, dtype=torch.float32, device=self.device).view(shape)
        std = torch.tensor(self.image_std, dtype=torch.float32, device=self.device).view(shape)
        return mean.expand(1, channels, 1, 1).contiguous(), std.expand(1, channels, 1, 1).contiguous()

    def make_rng(self, stream: int = 0) -> torch.Generator:
        """This rank's random stream: seeded with seed + rank, so ranks synthesize different samples
        (DESIGN.md fact 1); `stream` separates independent streams of one rank."""
        rng = torch.Generator(device=self.device)
        rng.manual_seed(self.seed + self.process_index + 1_000_003 * stream)
        return rng

    def autocast(self) -> contextlib.AbstractContextManager:
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        if self.mixed_precision not in dtypes:
            return contextlib.nullcontext()
        if self.mixed_precision == "fp16" and self.device.type == "cpu":
            return contextlib.nullcontext()  # Accelerate ignores fp16 on CPU too; the Distiller warns
        return torch.autocast(device_type=self.device.type, dtype=dtypes[self.mixed_precision])

    def make_scaler(self) -> Optional[torch.amp.GradScaler]:
        if self.mixed_precision == "fp16" and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def all_reduce_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Average gradients over ranks in one flat all-reduce, so a generator shared by all ranks
        learns from the global synthesis batch and stays identical everywhere."""
        if self.num_processes <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.num_processes
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class Synthesizer(ABC):
    """Base of every method. Subclasses set `name`, `config_class`, `paper`, and implement
    `synthesize` and `build_source`; the student's loss hook defaults to the config's criterion."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    paper: ClassVar[str]
    needs_batchnorm_teacher: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, teacher: nn.Module, *, image_shape: tuple[int, int, int],
                 num_classes: int, context: Optional[SynthesisContext] = None, task: str = "classification") -> None:
        self.config = config
        self.teacher = teacher
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.context = context or SynthesisContext()
        self.task = task
        self.scaler = self.context.make_scaler()
        self.rounds = 0

    @classmethod
    def check_image_shape(cls, config: MethodConfig, image_shape: tuple[int, int, int]) -> None:
        """Raise a ConfigError if this method cannot make images of this shape. Called before any
        model is loaded, so a wrong image_size fails fast."""

    # --- the contract ----------------------------------------------------------------------
    @abstractmethod
    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        """Run one synthesis round against `student` (unwrapped, in any mode). The only place that
        trains generators, latents or pixels. Must leave teacher and student parameters untouched."""

    @abstractmethod
    def build_source(self, batch_size: int):
        """The read side: a SyntheticSource yielding `batch_size` samples per batch for the student."""

    def student_losses(self, student_logits: Tensor, teacher_logits: Tensor, batch: SyntheticBatch) -> dict[str, Tensor]:
        """The student's loss on a batch (the method's loss hook): the configured KD criterion."""
        if self.config.student_loss == "l1":
            return {"kd": losses.l1_logits(student_logits, teacher_logits, weights=batch.weights)}
        return {"kd": losses.kd_kl(student_logits, teacher_logits, self.config.temperature, weights=batch.weights)}

    def student_step_hooks(self, teacher: nn.Module, student: nn.Module) -> contextlib.AbstractContextManager:
        """Entered by the loop around the teacher and student forwards of every student step, so a
        loss hook that needs intermediate features (ZSKT's attention transfer) can capture them
        with forward hooks that are removed when the step is done. Nothing by default."""
        return contextlib.nullcontext()

    def after_student_step(self, batch: SyntheticBatch, student_logits: Tensor, teacher_logits: Tensor) -> None:
        """Called by the loop after the backward of every student micro-batch, with that batch and its
        detached logits, so a method can feed what the student just saw back into its data (SSD-KD
        refreshes the replay priorities of `batch.indices` from the per-sample KL, Eq. 4). Runs on
        every rank on its own batch; must not touch the student. Nothing by default."""

    def modules(self) -> dict[str, nn.Module]:
        """Networks this synthesizer trains (for devices, grids and state)."""
        return {}

    def to_channels_last(self) -> None:
        """The teacher and every network of `modules()` in channels_last memory format (DistillConfig
        `channels_last`), in place, so the optimizers keep pointing at the same parameters."""
        for module in (self.teacher, *self.modules().values()):
            module.to(memory_format=torch.channels_last)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    # --- state: everything this rank needs to continue bit-identically ----------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rounds": self.rounds}
        state["modules"] = {k: m.state_dict() for k, m in self.modules().items()}
        state["optimizers"] = {k: o.state_dict() for k, o in self.optimizers().items()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        state.update(self.extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = state["rounds"]
        for key, module in self.modules().items():
            module.load_state_dict(state["modules"][key])
        for key, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][key])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Subclass hook: RNG streams, latents, buffers."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # --- helpers for subclasses ---------------------------------------------------------------
    def _step(self, loss: Tensor, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
              lr_scale: float, base_lr: float) -> None:
        """One optimizer step of synthesis parameters: backward (scaled under fp16), gradients
        averaged over ranks, the schedule's LR multiplier applied statelessly."""
        for group in optimizer.param_groups:
            group["lr"] = base_lr * lr_scale
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.context.all_reduce_gradients(params)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.context.all_reduce_gradients(params)
            optimizer.step()
