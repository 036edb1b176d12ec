"""Generator methods (DFAD, DAFL, ZSKT, DFQ, ...): one persistent generator with Adam, trained for
`generator_steps` steps on fresh latents every round, read through a GeneratorSource.

This is the zju-vipa `GenerativeSynthesizer` split (implementations.md section 1.1): a method only
says which loss terms its generator minimises (`generator_terms`) and how they are weighted
(`term_weights`); building the generator, its optimizer, its random stream, the train/eval and
frozen scopes, the step and the state live here once.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..config import ConfigError, MethodConfig
from ..hooks import frozen, training_mode
from ..models import build_generator
from .base import SynthesisOutput, Synthesizer
from .sources import GeneratorSource


@dataclass
class GenerativeConfig(MethodConfig):
    """Fields of every generator method; each method's config overrides the defaults it cites."""

    generator: str = "generator_a"
    nz: int = 256
    ngf: int = 64
    per_device_synthesis_batch_size: int = 256
    generator_steps: int = 1
    generator_lr: float = 1e-3
    generator_beta1: float = 0.9
    generator_beta2: float = 0.999
    # Whether the generator's LR follows the student's schedule multiplier (DFAD: yes; zju-vipa: no).
    generator_lr_follows_schedule: bool = False
    # The student's mode while the generator trains against it (VainF DFAD: train; zju-vipa: eval).
    student_mode_in_synthesis: Literal["train", "eval"] = "eval"
    # The generator's mode when the student's batches are sampled (BatchNorm batch vs running stats).
    sample_generator_in_train_mode: bool = True

    def validate(self) -> None:
        for name in ("student_steps_per_round", "generator_steps", "nz", "ngf", "per_device_synthesis_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0 or self.generator_lr <= 0:
            raise ConfigError(f"temperature and generator_lr must be positive, "
                              f"got {self.temperature} and {self.generator_lr}")

    def check_weights(self, method: str, **weights: float) -> None:
        """Loss weights are >= 0 (0 switches a term off) and at least one is positive."""
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 switches the term off), got {value}")
        if not any(weights.values()):
            raise ConfigError(f"{method} needs at least one positive loss weight ({', '.join(weights)}), "
                              "or its generator never learns")


def build_checked_generator(name: str, *, nz: int, ngf: int, image_shape: tuple[int, ...],
                            output_spaces: tuple[str, ...], method: str, use: str) -> nn.Module:
    """Generator `name` for `image_shape`, or one ConfigError that says what to change: a non-square
    shape, a size the generator cannot make, or an output space (models/generators.py) that `method`
    does not handle (`use` names the generators it does)."""
    channels, height, width = image_shape
    if height != width:
        raise ConfigError(f"{name} makes square images; got image shape {tuple(image_shape)}")
    try:
        generator = build_generator(name, nz=nz, image_size=height, channels=channels, ngf=ngf)
    except ValueError as err:
        raise ConfigError(f"image_size={height} cannot be produced by generator {name!r}: {err}") from None
    space = getattr(generator, "output_space", None)
    if space not in output_spaces:
        raise ConfigError(f"{method} takes generators with output space {' or '.join(map(repr, output_spaces))}; "
                          f"generator {name!r} has {space!r}: use {use}")
    return generator


def build_standardized_generator(config: GenerativeConfig, image_shape: tuple[int, ...]) -> nn.Module:
    """The method's generator. The generator methods feed its output to the teacher as it is, so a
    [0, 1] "pixel" generator (sigmoid_generator) is refused: use generator_a or generator_b."""
    return build_checked_generator(config.generator, nz=config.nz, ngf=config.ngf, image_shape=image_shape,
                                   output_spaces=("normalized", "tanh"), method="this generator method",
                                   use="generator_a or generator_b, whose output goes to the teacher as it "
                                       "is; a [0, 1] pixel generator would need the data set's normalisation first")


class GenerativeSynthesizer(Synthesizer):
    """Base of the generator methods. Subclasses implement `generator_terms` and `term_weights`."""

    config: GenerativeConfig
    # False for methods whose generator never sees the student (DAFL): it is then not run at all.
    uses_student: ClassVar[bool] = True

    def __init__(self, config: GenerativeConfig, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(config, teacher, **kwargs)
        config.validate()
        self.generator = build_standardized_generator(config, self.image_shape).to(self.context.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr,
                                          betas=(config.generator_beta1, config.generator_beta2))
        self.rng = self.context.make_rng(stream=0)  # latents of the generator steps

    @classmethod
    def check_image_shape(cls, config: GenerativeConfig, image_shape: tuple[int, int, int]) -> None:
        build_standardized_generator(config, image_shape)

    @abstractmethod
    def generator_terms(self, images: Tensor, student: nn.Module) -> dict[str, Tensor]:
        """The unweighted loss terms of one generator step on `images` (inside autocast, student
        frozen). Terms whose weight is 0 may be left out."""

    @abstractmethod
    def term_weights(self) -> dict[str, float]:
        """Term name -> weight, from the config."""

    def _scope(self, student: nn.Module) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.uses_student:
            stack.enter_context(frozen(student))
            stack.enter_context(training_mode(student, self.config.student_mode_in_synthesis == "train"))
        stack.enter_context(training_mode(self.generator, True))
        stack.enter_context(self.context.autocast())
        return stack

    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        cfg = self.config
        lr_scale = lr_scale if cfg.generator_lr_follows_schedule else 1.0
        params = list(self.generator.parameters())
        weights = self.term_weights()
        for _ in range(cfg.generator_steps):
            z = torch.randn(cfg.per_device_synthesis_batch_size, cfg.nz, generator=self.rng, device=self.rng.device)
            with self._scope(student):
                images = self.generator(z)
                terms = self.generator_terms(images, student)
                loss = sum(weights[name] * term for name, term in terms.items())
            self._step(loss, self.optimizer, params, lr_scale, cfg.generator_lr)
        self.rounds += 1
        return SynthesisOutput(losses={k: v.detach() for k, v in terms.items()}, images=images.detach())

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.optimizer}

    def build_source(self, batch_size: int) -> GeneratorSource:
        return GeneratorSource(self.generator, self.config.nz, batch_size, self.context.make_rng(stream=1),
                               generator_train_mode=self.config.sample_generator_in_train_mode)

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
