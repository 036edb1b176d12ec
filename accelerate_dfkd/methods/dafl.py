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

import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..config import ConfigError
from ..hooks import FeatureCapture, last_linear
from ..synthesis.generative import GenerativeConfig, GenerativeSynthesizer
from ..utils import logits_of


@dataclass
class DAFLConfig(GenerativeConfig):
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
        super().validate()
        self.check_weights("DAFL", one_hot_weight=self.one_hot_weight, activation_weight=self.activation_weight,
                           entropy_weight=self.entropy_weight)


class DAFL(GenerativeSynthesizer):
    name = "dafl"
    config_class = DAFLConfig
    paper = "Chen et al., Data-Free Learning of Student Networks, ICCV 2019 (arXiv:1904.01186)"
    config: DAFLConfig
    uses_student = False  # no adversarial term: the generator trains against the teacher alone

    def __init__(self, config: DAFLConfig, teacher: nn.Module, **kwargs: Any) -> None:
        if config.activation_weight > 0:
            try:
                last_linear(teacher)
            except ValueError as err:
                raise ConfigError(f"DAFL's activation term reads the teacher's penultimate features, the input of "
                                  f"its last nn.Linear: {err}; set activation_weight 0") from None
        super().__init__(config, teacher, **kwargs)

    def generator_terms(self, images: Tensor, student: nn.Module) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.config.activation_weight > 0:
            with FeatureCapture(last_linear(self.teacher), capture="input") as features:
                teacher_logits = logits_of(self.teacher(images))
            terms["activation"] = -features.value.float().abs().mean()
        else:
            teacher_logits = logits_of(self.teacher(images))
        logits = teacher_logits.float()
        terms["one_hot"] = F.cross_entropy(logits, logits.argmax(dim=1))
        # -H(mean softmax). The reference computes sum(p log p) without an epsilon, which is NaN as
        # soon as one class probability of the batch mean underflows to 0 (a confident teacher on a
        # collapsed generator); batch_entropy adds the epsilon.
        terms["entropy"] = -losses.batch_entropy(logits)
        return terms

    def term_weights(self) -> dict[str, float]:
        cfg = self.config
        return {"one_hot": cfg.one_hot_weight, "activation": cfg.activation_weight, "entropy": cfg.entropy_weight}
