"""DFQ: Data-Free Network Quantization With Adversarial Knowledge Distillation (Choi et al., CVPR
workshops 2020, arXiv:2005.04136), as re-implemented by zju-vipa for full-precision students.

An adversarial generator (like ZSKT) whose images must also match the teacher's BatchNorm running
statistics, be classified with confidence, and cover the classes evenly over a batch.

Symbol map (zju-vipa `GenerativeSynthesizer` terms -> here):
    adv * (-KL_T=1(teacher || student))         -> `adversarial` term, adversarial_weight
    bn  * sum_l ||mu_l - mean||_2 + ||s2_l - var||_2 -> `bn_stats` term (hooks.BatchNormStatistics
                                                   on every teacher BatchNorm2d), bn_weight
    oh  * CE(teacher logits, teacher argmax)    -> `one_hot` term, one_hot_weight
    balance * sum_k p_k log p_k (p = batch-mean teacher softmax)
                                                -> `balance` term = -losses.batch_entropy, balance_weight
    kd_steps 10 student steps per generator step -> student_steps_per_round

Defaults follow zju-vipa (Fast-Datafree / CMI `scripts/dfq_cifar.sh`, `datafree/synthesis/
generative.py`; implementations.md sections 2.5 and 3), with the real student in the adversarial
term (Fast-Datafree passes the teacher as the student, which zeroes that term; implementations.md
section 2.10.1). The original DFQ targets low-bit students; this class distils into whatever
student the Distiller trains.

BatchNorm: `needs_batchnorm_teacher` is False at class level because bn_weight = 0 ("DFQ without
BN") is a valid configuration for a teacher without BatchNorm (LeNet-5); with bn_weight > 0 the
constructor refuses a BN-less teacher with a ConfigError instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..config import ConfigError
from ..hooks import BatchNormStatistics, has_batchnorm
from ..synthesis.generative import GenerativeConfig, GenerativeSynthesizer
from ..utils import logits_of


@dataclass
class DFQConfig(GenerativeConfig):
    # Student loss: KL(teacher || student) at T = 1: the zju-vipa loop silently replaces the
    # script's --T 20 by KLDiv() for DFQ (implementations.md s.1.2).
    student_loss: Literal["kl", "l1"] = "kl"
    temperature: float = 1.0
    student_steps_per_round: int = 10  # dfq_cifar.sh --kd_steps 10
    generator_steps: int = 1           # dfq_cifar.sh --g_steps 1
    # Standardised output fed to the teacher as is; "pixel" generators are refused (no
    # normalisation hook; zju-vipa uses its sigmoid Generator + the data set's Normalizer).
    generator: str = "generator_a"
    nz: int = 256                      # datafree_kd.py: nz 256 for dfq
    ngf: int = 64                      # datafree_kd.py: Generator(ngf=64)
    per_device_synthesis_batch_size: int = 256  # dfq_cifar.sh --batch_size 256
    generator_lr: float = 1e-3         # dfq_cifar.sh --lr_g 1e-3
    generator_beta1: float = 0.5       # generative.py: Adam(betas=(0.5, 0.999))
    generator_beta2: float = 0.999
    generator_lr_follows_schedule: bool = False  # zju-vipa has no scheduler for the generator
    adversarial_weight: float = 1.0    # dfq_cifar.sh --adv 1
    bn_weight: float = 1.0             # dfq_cifar.sh --bn 1
    one_hot_weight: float = 1.0        # dfq_cifar.sh --oh 1
    balance_weight: float = 20.0       # dfq_cifar.sh --balance 20 (natural log)
    # generative.py calls `self.student.eval()` before the generator step.
    student_mode_in_synthesis: Literal["train", "eval"] = "eval"
    # Fast-Datafree samples in train() mode (batch statistics); the CMI repo in eval() mode.
    sample_generator_in_train_mode: bool = True

    def validate(self) -> None:
        super().validate()
        self.check_weights("DFQ", adversarial_weight=self.adversarial_weight, bn_weight=self.bn_weight,
                           one_hot_weight=self.one_hot_weight, balance_weight=self.balance_weight)


class DFQ(GenerativeSynthesizer):
    name = "dfq"
    config_class = DFQConfig
    paper = ("Choi et al., Data-Free Network Quantization With Adversarial Knowledge Distillation, "
             "CVPR Workshops 2020 (arXiv:2005.04136)")
    config: DFQConfig
    # Checked per instance in __init__: only bn_weight > 0 needs BatchNorm in the teacher.
    needs_batchnorm_teacher = False

    def __init__(self, config: DFQConfig, teacher: nn.Module, **kwargs: Any) -> None:
        if config.bn_weight > 0 and not has_batchnorm(teacher):
            raise ConfigError(
                f"DFQ's BN-statistics term needs a teacher with BatchNorm; {type(teacher).__name__} has no "
                "BatchNorm2d layer (LeNet-5 has none): set --bn_weight 0 for DFQ-without-BN")
        super().__init__(config, teacher, **kwargs)

    def generator_terms(self, images: Tensor, student: nn.Module) -> dict[str, Tensor]:
        cfg, terms = self.config, {}
        if cfg.bn_weight > 0:
            with BatchNormStatistics(self.teacher) as bn:
                teacher_logits = logits_of(self.teacher(images))
                terms["bn_stats"] = bn.loss()
        else:
            teacher_logits = logits_of(self.teacher(images))
        logits = teacher_logits.float()
        if cfg.adversarial_weight > 0:  # the student runs only when its term counts (as zju-vipa)
            student_logits = logits_of(student(images))
            terms["adversarial"] = -losses.kd_kl(student_logits, teacher_logits, temperature=1.0)
        terms["one_hot"] = F.cross_entropy(logits, logits.argmax(dim=1))
        # sum p log p of the batch-mean prediction; the reference has no epsilon (NaN once a class
        # probability underflows to 0), batch_entropy does.
        terms["balance"] = -losses.batch_entropy(logits)
        return terms

    def term_weights(self) -> dict[str, float]:
        cfg = self.config
        return {"adversarial": cfg.adversarial_weight, "bn_stats": cfg.bn_weight, "one_hot": cfg.one_hot_weight,
                "balance": cfg.balance_weight}
