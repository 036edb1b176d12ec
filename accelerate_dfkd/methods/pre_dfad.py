"""PRE-DFAD: DFAD with PRE-DFKD's memory generator (Binici et al., AAAI 2022, Ablation Study and
Fig. 5: "we couple our memory generator to the DFAD baseline method ... We name the VAE-enhanced
baseline PRE-DFAD").

The novel samples come from DFAD's game (Generator-A maximising the teacher-student L1, DFAD
Eq. 6); everything else is PRE-DFKD's replay, unchanged: the VAE trained on novel and replayed
samples with the synthetic-data-aware reconstruction loss, class-balanced memory latents
(Algorithm 2) and the student's L1 on concatenated novel + memory batches. It is `PreDFKD` with
the novel generator's loss switched to DFAD's (`adversarial_loss="l1"`, no DAFL terms) and DFAD's
defaults for that generator; the paper gives no other setting for the ablation.

Symbol map: as methods/pre_dfkd.py, except
    L_G = -D(T, S), D = L1 of logits   -> adversarial_weight * losses.dfad_generator_loss
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .pre_dfkd import PreDFKD, PreDFKDConfig


@dataclass
class PreDFADConfig(PreDFKDConfig):
    # DFAD's novel-sample game (methods/dfad.py DFADConfig, VainF DFAD_cifar.py).
    adversarial_loss: Literal["js", "l1"] = "l1"
    one_hot_weight: float = 0.0
    entropy_weight: float = 0.0
    activation_weight: float = 0.0
    student_steps_per_round: int = 5          # DFAD: 5 student steps per generator step
    nz: int = 256                             # DFAD_cifar.py --nz 256 (MNIST: 100)
    per_device_synthesis_batch_size: int = 256  # DFAD_cifar.py --batch_size 256
    generator_lr: float = 1e-3                # DFAD: Adam lr 1e-3, default betas
    # DFAD decays the generator's LR with the student's; here the VAE's follows too (one switch).
    generator_lr_follows_schedule: bool = True
    # Generator-A exactly: no spectral norm, PyTorch's BatchNorm eps and init (network/gan.py).
    novel_generator_spectral_norm: bool = False
    bn_eps: float = 1e-5
    weight_init_range: float = 0.0


class PreDFAD(PreDFKD):
    name = "pre_dfad"
    config_class = PreDFADConfig
    paper = ("Binici et al., Robust and Resource-Efficient Data-Free Knowledge Distillation by Generative "
             "Pseudo Replay, AAAI 2022 (PRE-DFAD ablation); DFAD: Fang et al., arXiv:1912.11006")
    config: PreDFADConfig
