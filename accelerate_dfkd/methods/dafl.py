"""DAFL: Data-Free Learning of Student Networks (Chen et al., ICCV 2019, arXiv:1904.01186).

The teacher is a fixed discriminator: a generator learns to make images on which the teacher gives
confident one-hot predictions, large penultimate activations and, over the batch, a balanced class
distribution. The student then learns by KD from the teacher on the generator's images. There is
no adversarial term: the student never enters the generator's loss, so `synthesize()` does not
run it at all.

Symbol map (paper -> here):
    G(z)                                 -> self.generator (models `generator_a`: DAFL's generator,
                                            the same Linear-BN-upsample-conv stack ending in
                                            BN(affine=False) as DFAD's Generator-A)
    L_oh = 1/n sum_i H_cross(y_T^i, t^i) -> `one_hot` term: CE(teacher logits, teacher argmax)
    L_a  = -1/n sum_i ||f_T^i||_1        -> `activation` term: -mean |penultimate teacher features|
                                            (the input of the teacher's last nn.Linear, a hook)
    L_ie = -H_info(1/n sum_i y_T^i)      -> `entropy` term: -losses.batch_entropy(teacher logits)
    L_Total = L_oh + alpha L_a + beta L_ie -> one_hot_weight * L_oh + activation_weight * L_a
                                            + entropy_weight * L_ie
    L_KD(S) on G's images                 -> student_losses: KL(teacher || student) at T = 1

Defaults follow the zju-vipa re-implementation (Fast-Datafree / CMI `scripts/dafl_cifar.sh` and
`datafree/synthesis/generative.py`, implementations.md sections 2.3 and 3), which produced the DAFL
rows everyone compares against (Fast-DFKD Table 1). The original code (huawei-noah DAFL,
`DAFL_train.py`) weighs the terms oh 1, a 0.1, ie 5 with a log10 entropy (ie 5 in log10 is about
2.17 in nats), Adam lr 0.02 for the generator, bs 1024, latent 1000 on CIFAR (implementations.md
sections 2.3 and 2.9); recipes may switch to those weights, the digits recipe says which it uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..config import ConfigError, MethodConfig
from ..hooks import FeatureCapture, last_linear, training_mode
from ..models import build_generator
from ..synthesis import GeneratorSource, SynthesisOutput, Synthesizer
from ..utils import logits_of


@dataclass
class DAFLConfig(MethodConfig):
    # Student loss: KL(teacher || student) at T = 1. The zju-vipa script passes --T 20 but
    # datafree_kd.py silently replaces the criterion by KLDiv() (T = 1) for DAFL (implementations.md
    # s.1.2); the original DAFL_train.py `kdloss` is the same KL at T = 1.
    student_loss: Literal["kl", "l1"] = "kl"
    temperature: float = 1.0
    # 5 student steps per generator step (dafl_cifar.sh --kd_steps 5, --ep_steps 400).
    student_steps_per_round: int = 5
    generator_steps: int = 1         # dafl_cifar.sh --g_steps 1
    # DAFL's generator outputs BN(affine=False)-standardised images, fed to the teacher as they
    # are. zju-vipa uses its sigmoid Generator plus the data set's normalisation; the library has
    # no normalisation hook, so "pixel" generators are refused (validate_generator).
    generator: str = "generator_a"
    nz: int = 512                    # datafree_kd.py: `nz = 512 if args.method == 'dafl' else 256`
    ngf: int = 64                    # datafree_kd.py: Generator(ngf=64)
    per_device_synthesis_batch_size: int = 256  # dafl_cifar.sh --batch_size 256 (synthesis bs = bs)
    generator_lr: float = 1e-3       # dafl_cifar.sh --lr_g 1e-3 (original DAFL: 0.02)
    generator_beta1: float = 0.5     # generative.py: Adam(betas=(0.5, 0.999))
    generator_beta2: float = 0.999
    # zju-vipa builds no scheduler for the generator: its LR stays constant while the student's decays.
    generator_lr_follows_schedule: bool = False
    one_hot_weight: float = 1.0      # dafl_cifar.sh --oh 1 (original: --oh 1)
    activation_weight: float = 0.001 # dafl_cifar.sh --act 0.001 (original: --a 0.1)
    # dafl_cifar.sh --balance 20, natural log (original: --ie 5 with log10, i.e. about 2.17 in nats).
    entropy_weight: float = 20.0
    # Fast-Datafree samples the student's batches from the generator in train() mode (batch
    # statistics in its BatchNorms), as the original DAFL does (the student learns on the very
    # batch the generator just produced in train mode); the CMI repo samples in eval() mode.
    sample_generator_in_train_mode: bool = True

    def validate(self) -> None:
        for name in ("student_steps_per_round", "generator_steps", "nz", "ngf", "per_device_synthesis_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0 or self.generator_lr <= 0:
            raise ConfigError(f"temperature and generator_lr must be positive, "
                              f"got {self.temperature} and {self.generator_lr}")
        weights = {"one_hot_weight": self.one_hot_weight, "activation_weight": self.activation_weight,
                   "entropy_weight": self.entropy_weight}
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 switches the term off), got {value}")
        if not any(weights.values()):
            raise ConfigError("DAFL needs at least one positive loss weight (one_hot_weight, activation_weight, "
                              "entropy_weight), or its generator never learns")


def build_standardized_generator(config: Any, image_shape: tuple[int, ...]) -> nn.Module:
    """The method's generator, refusing shapes it cannot make and [0, 1] "pixel" generators.

    A pixel-space generator (sigmoid_generator) needs the data set's mean/std applied before the
    teacher, as the zju-vipa code does with its Normalizer; the library has no such hook yet, so
    feeding [0, 1] images to a teacher trained on standardised inputs would silently shift them.
    """
    channels, height, width = image_shape
    if height != width:
        raise ConfigError(f"{config.generator} makes square images; got image shape {tuple(image_shape)}")
    try:
        generator = build_generator(config.generator, nz=config.nz, image_size=height, channels=channels,
                                    ngf=config.ngf)
    except ValueError as err:
        raise ConfigError(f"image_size={height} cannot be produced by generator {config.generator!r}: {err}") from None
    if getattr(generator, "output_space", None) == "pixel":
        raise ConfigError(
            f"generator {config.generator!r} makes [0, 1] pixel images that need the data set's normalisation "
            "before the teacher, and the library has no normalisation hook yet: use generator_a (standardised "
            "output, fed to the teacher as is) or generator_b")
    return generator


class DAFL(Synthesizer):
    name = "dafl"
    config_class = DAFLConfig
    paper = "Chen et al., Data-Free Learning of Student Networks, ICCV 2019 (arXiv:1904.01186)"
    config: DAFLConfig

    def __init__(self, config: DAFLConfig, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(config, teacher, **kwargs)
        config.validate()
        if config.activation_weight > 0:
            try:
                last_linear(teacher)
            except ValueError as err:
                raise ConfigError(f"DAFL's activation term reads the teacher's penultimate features, the input of "
                                  f"its last nn.Linear: {err}; set activation_weight 0") from None
        self.generator = build_standardized_generator(config, self.image_shape).to(self.context.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr,
                                          betas=(config.generator_beta1, config.generator_beta2))
        self.rng = self.context.make_rng(stream=0)  # latents of the generator steps

    @classmethod
    def check_image_shape(cls, config: DAFLConfig, image_shape: tuple[int, int, int]) -> None:
        build_standardized_generator(config, image_shape)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.optimizer}

    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        """Generator steps against the teacher alone; `student` is not used (DAFL has no adversarial term)."""
        cfg = self.config
        lr_scale = lr_scale if cfg.generator_lr_follows_schedule else 1.0
        params = list(self.generator.parameters())
        for _ in range(cfg.generator_steps):
            z = torch.randn(cfg.per_device_synthesis_batch_size, cfg.nz, generator=self.rng, device=self.rng.device)
            terms: dict[str, torch.Tensor] = {}
            with training_mode(self.generator, True), self.context.autocast():
                images = self.generator(z)
                if cfg.activation_weight > 0:
                    with FeatureCapture(last_linear(self.teacher), capture="input") as features:
                        teacher_logits = logits_of(self.teacher(images))
                    terms["activation"] = -features.value.float().abs().mean()
                else:
                    teacher_logits = logits_of(self.teacher(images))
                logits = teacher_logits.float()
                terms["one_hot"] = F.cross_entropy(logits, logits.argmax(dim=1))
                # -H(mean softmax). The reference computes sum(p log p) without an epsilon, which is NaN
                # as soon as one class probability of the batch mean underflows to 0 (a confident
                # teacher on a collapsed generator); batch_entropy adds the epsilon.
                terms["entropy"] = -losses.batch_entropy(logits)
                weights = {"one_hot": cfg.one_hot_weight, "activation": cfg.activation_weight,
                           "entropy": cfg.entropy_weight}
                loss = sum(weights[k] * v for k, v in terms.items())
            self._step(loss, self.optimizer, params, lr_scale, cfg.generator_lr)
        self.rounds += 1
        return SynthesisOutput(losses={k: v.detach() for k, v in terms.items()}, images=images.detach())

    def build_source(self, batch_size: int) -> GeneratorSource:
        return GeneratorSource(self.generator, self.config.nz, batch_size, self.context.make_rng(stream=1),
                               generator_train_mode=self.config.sample_generator_in_train_mode)

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
