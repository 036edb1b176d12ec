"""ZSKT: Zero-shot Knowledge Transfer via Adversarial Belief Matching (Micaelli & Storkey,
NeurIPS 2019, arXiv:1905.09768), as re-implemented by zju-vipa.

A generator looks for images on which the student disagrees most with the teacher (it maximises
KL(teacher || student)); the student minimises the same KL on the generator's images.

Symbol map (paper -> here):
    G(z; phi)                         -> self.generator (models `generator_a`: a Linear-BN-upsample
                                         stack ending in BN(affine=False), like the original's)
    D_KL(T(x_p) || S(x_p))            -> losses.kd_kl(student_logits, teacher_logits, T=1)
    L_G = -D_KL (generator maximises)  -> `adversarial` term, times adversarial_weight
    L_S = D_KL + beta L_AT            -> student_losses: the KL at T = 1 (beta = 0, see below)
    n_G = 1, n_S = 5                  -> generator_steps, student_steps_per_round

Defaults follow the zju-vipa code (Fast-Datafree / CMI `scripts/zskt_cifar.sh`,
`datafree/synthesis/generative.py`, implementations.md sections 2.4 and 3), with the real student
in the adversarial term (Fast-Datafree passes the teacher as the student, which makes the term
identically zero, implementations.md section 2.10.1; the CMI repo passes the student).

Differences from the original (polo5/ZeroShotKnowledgeTransfer, implementations.md s.2.4): the
original takes 10 student steps on the same pseudo batch, bs 128, z_dim 100, Adam for the student
(2e-3), cosine schedules, gradient clipping at 5 and an attention-transfer term with beta = 250 on
the outputs of the network's stages. zju-vipa drops AT and clipping, so AT is off by default here;
`attention_weight: 250` with `attention_layers: [block1, block2, block3]` (the WRN stage outputs)
switches the original's term on. Its features are captured by forward hooks that the loop enters
around each student step (`student_step_hooks`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..config import ConfigError
from ..hooks import FeatureCapture
from ..synthesis.generative import GenerativeConfig, GenerativeSynthesizer
from ..utils import logits_of


@dataclass
class ZSKTConfig(GenerativeConfig):
    # Student loss: KL(teacher || student) at T = 1: the original's forward KL, and what the
    # zju-vipa loop silently forces (KLDiv() overrides --T 20, implementations.md s.1.2).
    student_loss: Literal["kl", "l1"] = "kl"
    temperature: float = 1.0
    student_steps_per_round: int = 5  # zskt_cifar.sh --kd_steps 5 (original: 10 on one pseudo batch)
    generator_steps: int = 1          # zskt_cifar.sh --g_steps 1 (original: 1)
    # Standardised output fed to the teacher as is (the original generator ends in
    # BN(affine=False) too); "pixel" generators are refused, there is no normalisation hook.
    generator: str = "generator_a"
    nz: int = 256                     # datafree_kd.py: nz 256 for zskt (original z_dim 100)
    ngf: int = 64                     # datafree_kd.py: Generator(ngf=64)
    per_device_synthesis_batch_size: int = 256  # zskt_cifar.sh --batch_size 256 (original 128)
    generator_lr: float = 1e-3        # zskt_cifar.sh --lr_g 1e-3 (original 1e-3 too)
    generator_beta1: float = 0.5      # generative.py: Adam(betas=(0.5, 0.999))
    generator_beta2: float = 0.999
    # zju-vipa keeps the generator's LR constant (the original decays it with a cosine schedule).
    generator_lr_follows_schedule: bool = False
    adversarial_weight: float = 1.0   # zskt_cifar.sh --adv 1
    # generative.py calls `self.student.eval()` before the generator step (BatchNorm on running
    # statistics, no running-stat updates); "train" is VainF DFAD's choice.
    student_mode_in_synthesis: Literal["train", "eval"] = "eval"
    # Fast-Datafree samples in train() mode (batch statistics), as the original does (the student
    # learns on the batch the generator just made); the CMI repo samples in eval() mode.
    sample_generator_in_train_mode: bool = True

    # Attention transfer (original ZSKT: beta = 250 on the outputs of WRN's three stages); zju-vipa: off.
    attention_weight: float = 0.0
    attention_layers: list[str] = field(default_factory=list)  # module names, the same in teacher and student

    def validate(self) -> None:
        super().validate()
        if self.attention_weight < 0:
            raise ConfigError(f"attention_weight must be >= 0, got {self.attention_weight}")
        if self.attention_weight > 0 and not self.attention_layers:
            raise ConfigError("attention_weight > 0 needs attention_layers: the names of the modules whose outputs "
                              "are compared, e.g. --attention_layers [block1,block2,block3] for WRNs")
        if self.adversarial_weight <= 0:
            raise ConfigError(f"adversarial_weight must be positive: it is ZSKT's only generator loss, "
                              f"got {self.adversarial_weight}")


def attention_map(features: Tensor) -> Tensor:
    """Zagoruyko & Komodakis attention map: the channel mean of squared activations, flattened and
    L2-normalised per sample. (N, C, H, W) -> (N, H*W), computed in float32."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
    """ZSKT's L_AT as the paper writes it: sum over layers of ||a_S - a_T||_2 per sample (normalised
    attention maps), averaged over the batch; not checked against polo5's code, which may use a
    squared variant. Layers are paired in order and must have matching spatial sizes."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"attention transfer pairs layers one to one, got {len(student_features)} student "
                         f"and {len(teacher_features)} teacher feature maps")
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_features, teacher_features):
        if s.shape[-2:] != t.shape[-2:]:
            raise ValueError(f"attention maps need the same spatial size, got {tuple(s.shape)} and {tuple(t.shape)}")
        total = total + (attention_map(s) - attention_map(t)).norm(dim=1).mean()
    return total


class ZSKT(GenerativeSynthesizer):
    name = "zskt"
    config_class = ZSKTConfig
    paper = ("Micaelli & Storkey, Zero-shot Knowledge Transfer via Adversarial Belief Matching, "
             "NeurIPS 2019 (arXiv:1905.09768)")
    config: ZSKTConfig

    def generator_terms(self, images: Tensor, student: nn.Module) -> dict[str, Tensor]:
        teacher_logits = logits_of(self.teacher(images))
        student_logits = logits_of(student(images))
        # zju-vipa: loss_adv = -KLDiv()(s_out, t_out), i.e. -KL(teacher || student) at T = 1
        return {"adversarial": -losses.kd_kl(student_logits, teacher_logits, temperature=1.0)}

    def term_weights(self) -> dict[str, float]:
        return {"adversarial": self.config.adversarial_weight}

    def student_step_hooks(self, teacher: nn.Module, student: nn.Module) -> contextlib.AbstractContextManager:
        self._captures: tuple[list[FeatureCapture], list[FeatureCapture]] = ([], [])
        if self.config.attention_weight <= 0:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for which, model in zip(self._captures, (teacher, student)):
            modules = dict(model.named_modules())
            for name in self.config.attention_layers:
                if name not in modules:
                    raise ConfigError(f"attention layer {name!r} is not a module of {type(model).__name__}; "
                                      f"known top-level names: {[n for n, _ in model.named_children()]}")
                which.append(stack.enter_context(FeatureCapture(modules[name])))
        return stack

    def student_losses(self, student_logits: Tensor, teacher_logits: Tensor, batch) -> dict[str, Tensor]:
        terms = super().student_losses(student_logits, teacher_logits, batch)
        teacher_caps, student_caps = getattr(self, "_captures", ([], []))
        if self.config.attention_weight > 0 and student_caps:
            at = attention_transfer_loss([c.value for c in student_caps], [c.value.detach() for c in teacher_caps])
            terms["attention"] = self.config.attention_weight * at
        return terms
