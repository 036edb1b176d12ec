"""SSD-KD: Small Scale Data-Free Knowledge Distillation (Liu, Wang, Liu, Sun and Yao, CVPR 2024,
arXiv:2406.07876; shared/papers/ssd-kd-cvpr2024.txt).

No public code exists (OSVAI/SSD-KD holds only a README, implementations.md section 2.8): this is a
re-implementation from the paper, the first one we know of. The student distils from a small,
fixed-size replay buffer (by default 10% of the original training-set size, the paper's "small data
scale") that each synthesis round updates partially, and reads it by priority sampling.

One round (Algorithm 1, one "epoch" of its outer loop):
  (1) data inversion, FastDFKD's (the paper follows the settings of [11] = FastDFKD, Sec. 4.1, and
      Fig. 3 draws it as "D-KD with memory bank"): SSDKD subclasses methods/fast_dfkd.FastDFKD, so a
      fast copy of the meta generator and fresh latents z take `generator_steps` Adam steps on Eq. (2),
          L_BN(x) + L_KD(x) + phi(x) L_Task(x)     (the generator maximises L_KD: adversarial),
      with FastDFKD's momentum BatchNorm statistics, decision-adversarial term and meta update;
      SSD-KD only replaces FastDFKD's plain one-hot CE by the phi-weighted task loss;
  (2) the round's images enter the buffer with priorities delta (Alg. 1 lines 12-15), the oldest
      leave so |B| stays constant;
  (3) `student_steps_per_round` KD steps (run by the Distiller) on batches drawn from B with
      probability P(x) (Eq. 6), the KD loss weighted by the importance-sampling weights w(x) (Eq. 5);
      after each step the drawn samples get new priorities delta = w(x) KL(f_t(x) || f_s(x)) (Eq. 4,
      Alg. 1 lines 19-21) through the `after_student_step` hook the Distiller calls.

Symbol map (paper -> here):
    B, |B|                          -> self.pool (a PriorityReplayBuffer, FIFO), pool_capacity or
                                       floor(data_scale * original_train_set_size), split over ranks
    phi(x) (Eq. 3)                  -> modulating_function(): (1 - share of B with the same teacher
                                       class) * (1 - p_T(x))^gamma; diversity_balancing, gamma
    L_Task (Sec. 3.1: CE with the teacher's prediction as ground truth)
                                    -> `task` term, one_hot_weight (FastDFKD's `oh`), task_targets
    L_BN (Eq. 1)                    -> `bn_stats` term, bn_weight, bn_momentum (FastDFKD)
    max_g L_KD                      -> `adversarial` term (FastDFKD decision adversarial), adversarial_weight
    delta_i(x) (Eq. 4)              -> the buffer's priorities; new samples: new_sample_priority
    P_i(x) (Eq. 6): alpha, epsilon  -> priority_alpha, priority_eps (synthesis/replay.PriorityReplayBuffer)
    w_i(x) (Eq. 5): beta            -> priority_beta; batch.weights (normalised by max_j w_j)
    T_g, T_kd (Alg. 1)              -> generator_steps, student_steps_per_round
    Table 4 ablations               -> PS off: priority_alpha 0 (uniform, all weights 1);
                                       Difficulty off: gamma 0; Diversity off: diversity_balancing false

Choices the paper leaves open (it defers "detailed settings" to a supplementary material we do not
have, and publishes no values of gamma, alpha, beta or epsilon), each an option:
  * gamma = 2: the focal loss's value (Lin et al. ICCV 2017, ref. [16], which Eq. 3 follows);
    alpha 0.6, beta 0.4, epsilon 1e-6: prioritised experience replay's proportional variant
    (Schaul et al., ref. [26]; see synthesis/replay.py). beta is not annealed.
  * L_Task and phi's c_T, p_T: the task loss is CE against the teacher's own argmax (Sec. 3.1,
    "the cross-entropy loss using the teacher's predication as the ground truth"), so c_T(x) and
    p_T(x) of Eq. 3 are the class and the probability of that target, exactly as the focal loss
    weighs the probability of the target class. `task_targets: random` uses FastDFKD's uniformly
    random targets instead; phi then takes the target's class and the teacher's probability of it.
  * Which B phi counts: Eq. 3 is written for x in B, but x is being synthesised. We count the
    teacher classes of the samples stored in B (as at the start of the round) together with the
    current synthesis batch (as if it had already joined B), recomputed at every inner step. This
    also defines phi in the first round, when B is empty. The counts are GLOBAL: the
    (num_classes,) histogram is all-reduced over ranks (DESIGN.md fact 6), so every rank balances
    against the whole buffer.
  * phi is a weight: the class share is a count (no gradient); the difficulty factor keeps its
    gradient, as in the focal loss (whose modulating factor is not detached).
  * A stored sample's class is the teacher's argmax on the stored image (teacher space, no augmentation).
  * The priority's KL is the per-sample KD loss the student minimises (temperature T, times T^2;
    Sec. 3.1's L_KD, which Eq. 4 refers to), on the view the student saw. New samples get their
    priority from the student's current KL with w = 1 (Alg. 1 lines 12-14, "w_{-1}(x) = 1"),
    student in eval mode so that its BatchNorm statistics are not touched; `new_sample_priority:
    max` gives them the largest stored priority instead (Schaul et al. Algorithm 1).
  * Sec. 3.2 says the sampling stage "reuses the same intermediate values as phi(x)": we read this as
    the teacher's predictions, which both need; Eq. 4 (delta = w KL) is implemented as written.
  * Replacement is FIFO (Alg. 1 line 15, "remove old samples"); sampling is with replacement; a
    slot drawn twice in one batch keeps its last priority. Warm-up rounds fill the buffer too.
  * The data scale is |B|, not the number of KD steps: the paper keeps FastDFKD's epochs and
    schedule (Sec. 4.1), so recipes keep FastDFKD's rounds and steps.
  * Distributed: every rank keeps its own buffer of |B| // world_size samples, draws its own batches
    and updates its own priorities; the class histogram and the meta-gradient are all-reduced.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..config import ConfigError
from ..hooks import BatchNormStatistics, training_mode
from ..synthesis.augment import Augment
from ..synthesis.base import SynthesisContext, SynthesisOutput, SyntheticBatch
from ..synthesis.replay import REPLAY_DTYPES, PriorityReplayBuffer
from ..synthesis.sources import PrioritySource
from ..utils import logits_of
from .fast_dfkd import AugmentAndNormalize, FastDFKD, FastDFKDConfig


# --- the modulating function (a pure function) -------------------------------------------------------
def modulating_function(classes: Tensor, probabilities: Tensor, class_counts: Tensor, gamma: float,
                        diversity_balancing: bool = True) -> Tensor:
    """SSD-KD Eq. 3, per sample: phi(x) = (1 - |{x' in B : c(x') = c(x)}| / |B|) * (1 - p(x))^gamma.

    `classes` (N,) are c(x), `probabilities` (N,) are p(x), `class_counts` (num_classes,) is the class
    histogram of B (its sum is |B|). Without `diversity_balancing` the first factor is 1."""
    difficulty = (1.0 - probabilities.float()).clamp_min(0.0) ** gamma
    if not diversity_balancing:
        return difficulty
    counts = class_counts.to(difficulty.device, torch.float32)
    share = counts[classes] / counts.sum().clamp_min(1.0)
    return (1.0 - share) * difficulty


# --- config ------------------------------------------------------------------------------------------
@dataclass
class SSDKDConfig(FastDFKDConfig):
    """FastDFKD's fields and defaults (methods/fast_dfkd.py: fast_cifar.sh, Fast-5, ResNet-34 -> ResNet-18),
    which SSD-KD keeps (Sec. 4.1: "we always adopt the same basic settings as in [11]"), plus SSD-KD's own."""

    # |B| over all ranks; None: floor(data_scale * original_train_set_size). FastDFKD's growing pool becomes
    # SSD-KD's small dynamic buffer.
    pool_capacity: Optional[int] = None  # type: ignore[assignment]
    data_scale: float = 0.1                       # |B| = 10% of the training set (Table 1, Fig. 1, Sec. 4.3)
    original_train_set_size: int = 50000          # CIFAR-10/100 (Sec. 4.1): |B| = 5000
    # --- the modulating function (Eq. 3) ------------------------------------------------------------
    gamma: float = 2.0                            # not published; the focal loss's gamma (ref. [16])
    diversity_balancing: bool = True              # Table 4 "Diversity"
    task_targets: Literal["teacher_argmax", "random"] = "teacher_argmax"   # Sec. 3.1; see the module docstring
    global_class_counts: bool = True              # all-reduce B's class histogram over ranks
    # --- priority sampling (Eq. 4-6) ------------------------------------------------------------------
    priority_alpha: float = 0.6                   # not published; Schaul et al. (ref. [26]); 0: uniform
    priority_beta: float = 0.4                    # not published; Schaul et al.; 0: no IS correction
    priority_eps: float = 1e-6                    # "a small positive constant" (Eq. 6); value not published
    priority_includes_is_weight: bool = True      # Eq. 4: delta = w * KL (false: delta = KL, as Schaul et al.)
    new_sample_priority: Literal["kl", "max"] = "kl"   # Alg. 1 lines 12-14; see the module docstring

    @property
    def buffer_capacity(self) -> int:
        """|B|, summed over ranks."""
        if self.pool_capacity is not None:
            return self.pool_capacity
        return int(math.floor(self.data_scale * self.original_train_set_size))

    def validate(self) -> None:
        if not 0.0 < self.data_scale <= 1.0:
            raise ConfigError(f"data_scale is a fraction of the training-set size in (0, 1], got {self.data_scale}")
        if self.original_train_set_size <= 0:
            raise ConfigError(f"original_train_set_size must be positive, got {self.original_train_set_size}")
        # FastDFKD's checks, with the resolved |B| in place of the optional pool_capacity.
        FastDFKDConfig.validate(dataclasses.replace(self, pool_capacity=self.buffer_capacity))
        for name in ("gamma", "priority_alpha", "priority_beta", "priority_eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        # B is small and fixed (10% of the training set) and its priority trees index it in memory.
        if self.replay_storage != "memory":
            raise ConfigError("SSD-KD's buffer B is small (data_scale of the training set) and kept in memory with "
                              "its priorities: leave replay_storage memory")
        if self.replay_dtype == "uint8":
            raise ConfigError("SSD-KD's priority buffer stores float16 or float32 images: set replay_dtype float16")
        if self.buffer_capacity < self.per_device_synthesis_batch_size:
            raise ConfigError(
                f"the buffer holds {self.buffer_capacity} samples but one round synthesises "
                f"per_device_synthesis_batch_size={self.per_device_synthesis_batch_size}: every round would replace "
                "the whole buffer, while SSD-KD updates it partially. Lower per_device_synthesis_batch_size, or raise "
                "pool_capacity (or data_scale / original_train_set_size)")


# --- the read side -------------------------------------------------------------------------------------
class NormalizedPrioritySource(AugmentAndNormalize, PrioritySource):
    """Priority samples with their slots and IS weights, then the KD augmentation on the stored images and
    the teacher's normalisation (FastDFKD's NormalizedReplaySource, drawn by priority). All draws come
    from the source's generator, so its state_dict covers them."""


# --- the method ---------------------------------------------------------------------------------------
class SSDKD(FastDFKD):
    name = "ssd_kd"
    config_class = SSDKDConfig
    paper = ("Liu, Wang, Liu, Sun and Yao, Small Scale Data-Free Knowledge Distillation, CVPR 2024 "
             "(arXiv:2406.07876)")
    config: SSDKDConfig

    def __init__(self, config: SSDKDConfig, teacher: nn.Module, **kwargs: Any) -> None:
        config.validate()
        if kwargs.get("task", "classification") != "classification":
            raise ConfigError("SSD-KD's modulating function needs class predictions: task must be classification")
        world = (kwargs.get("context") or SynthesisContext()).num_processes
        capacity = config.buffer_capacity // world     # this rank's share of |B|
        if capacity < config.per_device_synthesis_batch_size:
            raise ConfigError(
                f"with {world} processes each rank's buffer holds {capacity} of the {config.buffer_capacity} "
                f"samples, fewer than per_device_synthesis_batch_size={config.per_device_synthesis_batch_size}: "
                "lower the batch size, or raise pool_capacity (or data_scale / original_train_set_size)")
        # FastDFKD builds its pool from pool_capacity: build it at this rank's share, then make it a priority
        # buffer (FastDFKD's own writes go through PriorityReplayBuffer.add: FIFO, at the largest priority).
        super().__init__(dataclasses.replace(config, pool_capacity=capacity), teacher, **kwargs)
        self.config = config
        device = self.context.device
        self.pool = PriorityReplayBuffer(capacity, alpha=config.priority_alpha, beta=config.priority_beta,
                                         eps=config.priority_eps, dtype=REPLAY_DTYPES[config.replay_dtype],
                                         device=device)
        # The teacher's class of every stored sample (-1: empty slot), for phi's diversity factor.
        self.pool_classes = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self._round_histogram: Optional[Tensor] = None
        self._last_phi: Optional[Tensor] = None

    # --- the modulating function's class counts -------------------------------------------------
    def buffer_histogram(self) -> Tensor:
        """This rank's class histogram of B (float32, on the device)."""
        stored = self.pool_classes[: len(self.pool)]
        return torch.bincount(stored, minlength=self.num_classes).float()

    def class_counts(self, batch_classes: Tensor, buffer_histogram: Optional[Tensor] = None) -> Tensor:
        """Class histogram of B together with the current synthesis batch, summed over ranks when
        `global_class_counts` (one all-reduce of num_classes floats)."""
        hist = self.buffer_histogram() if buffer_histogram is None else buffer_histogram
        counts = hist + torch.bincount(batch_classes.detach(), minlength=self.num_classes).to(hist)
        if (self.config.global_class_counts and self.context.num_processes > 1 and dist.is_available()
                and dist.is_initialized()):
            dist.all_reduce(counts)
        return counts

    def task_loss(self, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        """phi(x) L_Task(x), batch mean (Eq. 2-3): per-sample CE against the teacher's argmax (or the
        random `targets`), weighted by the modulating function."""
        cfg = self.config
        t = teacher_logits.float()
        predicted = t.detach().argmax(1)
        goal = predicted if cfg.task_targets == "teacher_argmax" else targets
        log_p = F.log_softmax(t, dim=1).gather(1, goal[:, None])[:, 0]
        counts = self.class_counts(predicted, self._round_histogram)
        phi = modulating_function(goal, log_p.exp(), counts, cfg.gamma, cfg.diversity_balancing)
        self._last_phi = phi.detach().mean()
        return (phi * -log_p).mean()

    # --- FastDFKD's inversion, with phi * L_Task in place of the one-hot CE ---------------------------
    def term_weights(self) -> dict[str, float]:
        cfg = self.config
        return {"bn_stats": cfg.bn_weight, "task": cfg.one_hot_weight, "adversarial": cfg.adversarial_weight}

    def loss_terms(self, views: Tensor, targets: Tensor, student: nn.Module, bn: Optional[BatchNormStatistics],
                   adversarial: bool) -> dict[str, Tensor]:
        cfg, terms = self.config, {}
        teacher_logits = logits_of(self.teacher(views))
        if bn is not None:
            terms["bn_stats"] = bn.loss()
        if cfg.one_hot_weight > 0:
            terms["task"] = self.task_loss(teacher_logits, targets)
        if adversarial:
            terms["adversarial"] = losses.decision_adversarial(logits_of(student(views)), teacher_logits)
        return terms

    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        """FastDFKD's round (inversion, meta step, FIFO insertion at the largest priority), then Alg. 1
        lines 12-15 on the new slots: their teacher classes, and their priorities from the current KL."""
        self._round_histogram = self.buffer_histogram()
        first_slot = self.pool.seen          # FIFO: the i-th image ever offered lands in slot i % capacity
        output = super().synthesize(student, lr_scale)
        if self.pool.seen != first_slot + self.config.per_device_synthesis_batch_size:
            raise RuntimeError("FastDFKD.synthesize() no longer adds one batch per round: update SSDKD.synthesize()")
        slots = (first_slot + torch.arange(self.config.per_device_synthesis_batch_size)) % self.pool.capacity
        classes = self._admit(slots, output.images, student)
        counts = self.buffer_histogram()
        if self._last_phi is not None:
            output.losses["phi"] = self._last_phi
        output.losses["buffer_largest_class_share"] = counts.max() / counts.sum()
        output.losses["round_classes"] = torch.unique(classes).numel() * torch.ones((), device=classes.device)
        return output

    @torch.no_grad()
    def _admit(self, slots: Tensor, images: Tensor, student: nn.Module) -> Tensor:
        """Record the teacher classes of the new samples (teacher-space `images`) and, with
        new_sample_priority 'kl', set their priorities to the student's KL with w = 1."""
        with training_mode(self.teacher, False), self.context.autocast():
            teacher_logits = logits_of(self.teacher(images)).float()
            if self.config.new_sample_priority == "kl":
                with training_mode(student, False):
                    student_logits = logits_of(student(images)).float()
                self.pool.update_priorities(slots, losses.kd_kl_per_sample(student_logits, teacher_logits,
                                                                           self.config.temperature))
        classes = teacher_logits.argmax(1)
        self.pool_classes[slots.to(self.pool_classes.device)] = classes
        return classes

    # --- the read side and the priority feedback ----------------------------------------------------
    def build_source(self, batch_size: int) -> NormalizedPrioritySource:
        cfg = self.config
        rng = self.context.make_rng(stream=1)
        augment = None
        if cfg.kd_augment:
            augment = Augment(rng, padding=cfg.kd_augment_padding, resized_crop_scale=cfg.kd_resized_crop_scale)
        return NormalizedPrioritySource(self.pool, batch_size, rng, augment, self.normalize)

    def after_student_step(self, batch: SyntheticBatch, student_logits: Tensor, teacher_logits: Tensor) -> None:
        """Eq. 4 / Alg. 1 lines 19-21: delta(x) = w(x) KL(f_t(x) || f_s(x)) for the samples just drawn."""
        if batch.indices is None:
            raise ValueError("SSD-KD updates replay priorities, but the batch carries no buffer indices: "
                             "read batches from SSDKD.build_source()")
        kl = losses.kd_kl_per_sample(student_logits.detach(), teacher_logits.detach(), self.config.temperature)
        if self.config.priority_includes_is_weight and batch.weights is not None:
            kl = kl * batch.weights.to(kl)
        self.pool.update_priorities(batch.indices, kl)

    # --- state ----------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "pool_classes": self.pool_classes.cpu().clone()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.pool_classes.copy_(state["pool_classes"].to(self.pool_classes.device))
