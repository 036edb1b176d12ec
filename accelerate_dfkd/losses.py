"""Pure loss terms. Each is a small function of tensors with golden-value tests.

They compute in float32 whatever the input dtype: KL, entropy and L1 terms overflow or lose their
small differences in half precision (DESIGN.md, fact 7).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _weighted_mean(per_sample: Tensor, weights: Optional[Tensor]) -> Tensor:
    if weights is None:
        return per_sample.mean()
    weights = weights.to(per_sample.dtype)
    return (per_sample * weights).sum() / per_sample.shape[0]


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
          weights: Optional[Tensor] = None) -> Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) summed over classes, batch mean, times T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015;
    zju-vipa `datafree/criterions.py` KLDiv). Dense outputs (N, C, H, W) are averaged over pixels.
    `weights` (N,) are per-sample importance weights (SSD-KD Eq. 6), normalised by N, not by their sum.
    """
    return _weighted_mean(kd_kl_per_sample(student_logits, teacher_logits, temperature), weights)


def kd_kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """The (N,) per-sample terms of `kd_kl`: T^2 KL(softmax(t/T) || softmax(s/T)), dense outputs
    averaged over pixels. SSD-KD's replay priorities (Eq. 4) are made of these."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    per_element = (F.softmax(t, dim=1) * (F.log_softmax(t, dim=1) - F.log_softmax(s, dim=1))).sum(dim=1)
    per_sample = per_element.flatten(1).mean(dim=1) if per_element.dim() > 1 else per_element
    return per_sample * temperature**2


def l1_logits(student_logits: Tensor, teacher_logits: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Mean absolute error between logits over all elements: DFAD's model discrepancy (Eq. 2)."""
    diff = (student_logits.float() - teacher_logits.float()).abs()
    per_sample = diff.flatten(1).mean(dim=1)
    return _weighted_mean(per_sample, weights)


def dfad_generator_loss(student_logits: Tensor, teacher_logits: Tensor, dense: bool = False) -> Tensor:
    """DFAD's generator objective: maximise the L1 discrepancy.

    Classification: -L1 (DFAD Eq. 6). Dense outputs (segmentation): -log(L1 + 1), which keeps the
    generator's gradient bounded when the discrepancy grows (VainF DFAD_camvid_deeplab.py).
    """
    discrepancy = l1_logits(student_logits, teacher_logits)
    return -torch.log1p(discrepancy) if dense else -discrepancy


def js_divergence(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0, eps: float = 1e-7) -> Tensor:
    """Jensen-Shannon divergence between two categorical distributions given as logits, batch mean."""
    p = F.softmax(p_logits.float() / temperature, dim=1)
    q = F.softmax(q_logits.float() / temperature, dim=1)
    m = 0.5 * (p + q)
    kl_pm = (p * (torch.log(p + eps) - torch.log(m + eps))).sum(dim=1)
    kl_qm = (q * (torch.log(q + eps) - torch.log(m + eps))).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def batch_entropy(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Entropy of the batch-mean class distribution, natural log.

    DAFL's information-entropy term minimises -H(mean softmax); the reference computes
    sum(p log p) with no epsilon, which is NaN once a class probability underflows to 0
    (implementations.md section 9.9). The epsilon removes that hazard.
    """
    p_mean = F.softmax(logits.float(), dim=1).mean(dim=0)
    return -(p_mean * torch.log(p_mean + eps)).sum()


def decision_adversarial(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """CMI / FastDFKD's "decision adversarial" synthesis term: -mean_i[mask_i * KL_i(t || s)].

    KL_i = sum_c softmax(t_i) (log softmax(t_i) - log softmax(s_i)) at T = 1, and mask_i = 1 only where
    the student's argmax equals the teacher's, so only samples the student already gets right are pushed
    towards disagreement; the batch mean counts the masked-out samples as 0 (zju-vipa Fast-Datafree
    `fast_meta.py` and CMI `contrastive.py`, with `kldiv(..., reduction='none').sum(1)`). Minimise it.
    The mask carries no gradient. When student and teacher logits are equal the term and its gradient
    are exactly 0 (the two log-softmax paths cancel)."""
    s, t = student_logits.float(), teacher_logits.float()
    kl = (F.softmax(t, dim=1) * (F.log_softmax(t, dim=1) - F.log_softmax(s, dim=1))).sum(dim=1)
    mask = (s.argmax(dim=1) == t.argmax(dim=1)).to(kl.dtype)
    return -(kl * mask).mean()
