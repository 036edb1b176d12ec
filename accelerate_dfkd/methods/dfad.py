"""DFAD: Data-Free Adversarial Distillation (Fang et al., 2019, arXiv:1912.11006).

A generator is trained to *maximise* the discrepancy between teacher and student, the student to
minimise it on the generator's samples: a min-max game with the student and the frozen teacher as
the joint discriminator.

Symbol map (paper -> here):
    G(z; theta_g)                      -> self.generator (models `generator_a`, DFAD's Generator-A)
    D(T, S) = 1/n ||T(x) - S(x)||_1    -> losses.l1_logits (the student's loss, Eq. 2 / Eq. 5)
    L_G = -D (classification, Eq. 6)   -> losses.dfad_generator_loss(dense=False)
    L_G = -log(D + 1) (segmentation)   -> losses.dfad_generator_loss(dense=True)
    k (student steps per G step) = 5   -> student_steps_per_round

Defaults follow the public code VainF/Data-Free-Adversarial-Distillation (DFAD_cifar.py,
DFAD_mnist.py) and the paper's supplementary Table 7, unless noted. One deliberate fix: the
zju-vipa Fast-Datafree re-implementation passes the teacher as the student, which makes the
adversarial term identically zero (implementations.md section 2.10.1); here the live student is
used and a conformance test checks that the term reaches the generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from .. import losses
from ..synthesis.generative import GenerativeConfig, GenerativeSynthesizer
from ..utils import logits_of


@dataclass
class DFADConfig(GenerativeConfig):
    # Student loss: L1 on logits, the MAE discrepancy of Eq. 2 (DFAD_cifar.py `F.l1_loss`).
    student_loss: Literal["kl", "l1"] = "l1"
    # 5 student steps per generator step (DFAD_cifar.py: `for k in range(5)` in train()).
    student_steps_per_round: int = 5
    # Generator steps per round (DFAD_cifar.py: one step after the 5 student steps).
    generator_steps: int = 1
    generator: str = "generator_a"  # Generator-A for MNIST and CIFAR (paper, supp. A)
    nz: int = 256                    # DFAD_cifar.py --nz 256 (MNIST: 100)
    ngf: int = 64                    # Generator-A widths 128/64 = 2*ngf/ngf (network/gan.py)
    per_device_synthesis_batch_size: int = 256  # DFAD_cifar.py --batch_size 256 (MNIST 512)
    generator_lr: float = 1e-3       # Adam, lr 1e-3, default betas (paper, supp. A)
    generator_beta1: float = 0.9
    generator_beta2: float = 0.999
    # DFAD decays the generator's LR with the student's (paper s.4: "the learning rates of SGD and
    # Adam are decayed by 0.1 for every 100 epochs"; DFAD_cifar.py has a scheduler for each).
    generator_lr_follows_schedule: bool = True
    adversarial_weight: float = 1.0
    # VainF keeps the student in train() during the generator step (BatchNorm on batch
    # statistics); the zju-vipa loop switches it to eval(). "eval" is the deviation.
    student_mode_in_synthesis: Literal["train", "eval"] = "train"
    # The student's batches come from the generator in train() mode (VainF DFAD_cifar.py).
    sample_generator_in_train_mode: bool = True

    def validate(self) -> None:
        super().validate()
        self.check_weights("DFAD", adversarial_weight=self.adversarial_weight)


class DFAD(GenerativeSynthesizer):
    name = "dfad"
    config_class = DFADConfig
    paper = "Fang et al., Data-Free Adversarial Distillation, arXiv:1912.11006 (2019)"
    config: DFADConfig

    def generator_terms(self, images: Tensor, student: nn.Module) -> dict[str, Tensor]:
        teacher_logits = logits_of(self.teacher(images))
        student_logits = logits_of(student(images))
        dense = self.task == "segmentation"
        return {"adversarial": losses.dfad_generator_loss(student_logits, teacher_logits, dense=dense)}

    def term_weights(self) -> dict[str, float]:
        return {"adversarial": self.config.adversarial_weight}
