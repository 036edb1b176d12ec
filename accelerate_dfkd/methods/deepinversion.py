"""DeepInversion / ADI: Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion (Yin et
al., CVPR 2020, arXiv:1912.08795).

Pixels are optimised directly: every round starts a fresh batch of N(0, 1) images (in the
teacher's standardised input space) with random target labels and runs `synthesis_iterations` Adam
steps on the pixels, so that the teacher's BatchNorm running statistics are matched (DeepInversion)
and, with `adversarial_weight` > 0, the student disagrees with the teacher (Adaptive DeepInversion,
ADI). The iterate with the lowest total loss is appended to a pool (a ReplayBuffer of float16
tensors, never PNG files) and the student distils on uniform samples of the whole pool, with the
data set's training augmentation (crop with padding + horizontal flip).

Symbol map (paper Eq. / zju-vipa `DeepInvSyntheiszer` [sic] -> here):
    x_hat (optimised input batch)                  -> self.pixels (per rank, re-drawn every round)
    alpha_f * R_feature (Eq. 4), `bn`              -> `bn_stats` term, bn_weight
        sum_l ||mu_l - mean||_2 + ||s2_l - var||_2    (hooks.BatchNormStatistics on every teacher
                                                        BatchNorm2d; first layer x first_bn_weight)
    L(x_hat, y) (CE with the target labels), `oh`  -> `one_hot` term, one_hot_weight
    alpha_tv * R_TV, `tv`                          -> `tv` term (L1 variant: sum over 4 directions of the
                                                      mean |pixel difference|), tv_weight
    alpha_l2 * R_l2, `l2`                          -> `l2` term (mean per-image L2 norm, NVlabs), l2_weight
    alpha_c * R_compete (Eq. 8/9), `adv`           -> `adversarial` term = -jsdiv(student, teacher, T=3)
                                                      (zju-vipa form, `js_divergence_clamped`),
                                                      adversarial_weight
    jitter + flip before every teacher forward     -> jitter (roll by up to `jitter` px), flip
    best_cost / best_inputs                        -> lowest total loss over the round's iterates
    clip_images: channel c to [-m_c / s_c,         -> per channel to [(0 - mean) / std, (1 - mean) / std]
      (1 - m_c) / s_c] after every step               of the run's image_mean / image_std (SynthesisContext);
                                                      pixel_min / pixel_max override, clip_pixels off
    ImagePool + DataLoader(shuffle) + RandomCrop(pad 4) + flip
                                                   -> ReplayBuffer (FIFO, pool_capacity; replay_storage /
                                                      replay_dtype) + uniform ReplaySource + kd_augment /
                                                      kd_augment_padding
    kd_steps = ep_steps = 400                      -> student_steps_per_round

Defaults follow the zju-vipa re-implementation, which produced the CIFAR numbers everybody compares
with (`scripts/deepinv_cifar.sh`, `datafree/synthesis/deepinversion.py` in Fast-Datafree / CMI;
shared/reference/implementations.md sections 1.2, 1.3, 2.1 and 3), unless a field says otherwise.
Deviations, on purpose:
  * the stored "best" iterate is exactly the one that scored the lowest loss (zju-vipa aliases
    `.data` and keeps the state one step later, implementations.md 2.1), and the final iterate is
    scored too, so the returned images never score worse than the last iterate;
  * no "- 0.001 * student BN statistics" term (Fast-Datafree only; not in the CMI repo, not in the
    paper);
  * pixels are clipped after every step to the valid range of the teacher's input normalisation, per
    channel, as zju-vipa `clip_images`; when the run's normalisation is unknown (no image_mean /
    image_std, no eval set) and no pixel_min / pixel_max is given, nothing is clipped (NVlabs' CIFAR
    script does not clip either; `clip_pixels: false` does that on purpose);
  * the jitter offsets and the flip are drawn from this rank's torch.Generator (zju-vipa: Python's
    global `random`), all of a round's draws at once, so there is one host sync per round.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, MethodConfig
from ..hooks import BatchNormStatistics, frozen, has_batchnorm, training_mode
from ..synthesis.augment import random_crop_with_padding, random_horizontal_flip
from ..synthesis.base import SynthesisOutput, Synthesizer, SyntheticBatch
from ..synthesis.replay import ReplayBuffer, ReplayStorageConfig
from ..synthesis.sources import ReplaySource
from ..utils import logits_of


# --- loss terms (pure functions) ------------------------------------------------------------------
def js_divergence_clamped(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0,
                          low: float = 0.01, high: float = 0.99) -> Tensor:
    """zju-vipa `datafree/criterions.py` `jsdiv` (also NVlabs' ADI `loss_verifier_cig` before its
    `1 - clamp`): P, Q = softmax(s/T), softmax(t/T), M = (P + Q) / 2, each clamped to [low, high],
    then 0.5 * KL(M || P) + 0.5 * KL(M || Q), summed over classes, batch mean.

    Note the direction: `F.kl_div(log P, M)` is KL(M || P), so this is not the textbook JS
    divergence (KL(P || M) + KL(Q || M)) / 2; it is kept as the reference computes it. It is 0 when
    the two predictions agree, and then its gradient is exactly 0 too."""
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(low, high)
    p, q = p.clamp(low, high), q.clamp(low, high)
    batch = student_logits.shape[0]
    kl_mp = (m * (torch.log(m) - torch.log(p))).sum() / batch
    kl_mq = (m * (torch.log(m) - torch.log(q))).sum() / batch
    return 0.5 * kl_mp + 0.5 * kl_mq


def total_variation_l1(images: Tensor) -> Tensor:
    """The L1 image prior of DeepInversion (NVlabs `get_image_prior_losses` `loss_var_l1`, zju-vipa
    `get_image_prior_losses`): the mean absolute difference between neighbouring pixels in four
    directions (right, down, and the two diagonals), summed over the directions."""
    x = images.float()
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(d.abs().mean() for d in diffs)


def image_l2(images: Tensor) -> Tensor:
    """Mean over the batch of each image's L2 norm (NVlabs `deepinversion.py` `loss_l2`; zju-vipa uses
    the norm of the whole batch tensor, which grows with sqrt(batch size))."""
    return torch.linalg.vector_norm(images.float().flatten(1), dim=1).mean()


# --- config ------------------------------------------------------------------------------------------
@dataclass
class DeepInversionConfig(ReplayStorageConfig, MethodConfig):
    # Student loss: KL at T = 20 (zju-vipa deepinv_cifar.sh --T 20; the loop keeps it for pool methods,
    # implementations.md 1.2).
    student_loss: Literal["kl", "l1"] = "kl"
    temperature: float = 20.0
    # One synthesis round (one new batch) per 400 student steps (deepinv_cifar.sh kd_steps = ep_steps = 400).
    student_steps_per_round: int = 400
    per_device_synthesis_batch_size: int = 256   # deepinv_cifar.sh --batch_size 256 (NVlabs CIFAR bs 256)
    # Adam steps on the pixels per round: 2000 as NVlabs' CIFAR-10 script (deepinversion_cifar10.py)
    # and the "DeepInv-2k" of the Fast-DFKD table; the zju-vipa script itself runs --g_steps 1000.
    synthesis_iterations: int = 2000
    pixel_lr: float = 0.1                        # deepinv_cifar.sh --lr_g 0.1 (NVlabs ImageNet: 0.25 README)
    pixel_beta1: float = 0.5                     # zju-vipa deepinversion.py Adam betas (0.5, 0.99)
    pixel_beta2: float = 0.99
    # zju-vipa has no schedule for the pixel optimiser (its cosine scheduler is commented out).
    pixel_lr_follows_schedule: bool = False
    bn_weight: float = 10.0                      # deepinv_cifar.sh --bn 10
    # NVlabs ImageNet `first_bn_multiplier` 10; zju-vipa and NVlabs' CIFAR script weigh all layers alike.
    first_bn_weight: float = 1.0
    one_hot_weight: float = 1.0                  # deepinv_cifar.sh --oh 1
    adversarial_weight: float = 1.0              # deepinv_cifar.sh --adv 1 (ADI; 0 = plain DeepInversion)
    adversarial_temperature: float = 3.0         # zju-vipa jsdiv(T=3); NVlabs ADI T = 3
    tv_weight: float = 1e-3                      # CMI repo deepinv script --tv 1e-3 (Fast-Datafree: 0)
    l2_weight: float = 1e-5                      # NVlabs imagenet_inversion.py --l2 1e-5 (zju-vipa: 0)
    # Roll jitter bound in pixels; None: 1/8 of the image side (zju-vipa jitter_and_flip(lim=1/8),
    # 4 px at 32x32; NVlabs: 30 px at 224, 2 px in its CIFAR script).
    jitter: Optional[int] = None
    flip: bool = True                            # zju-vipa: one flip p = 0.5 for the whole batch
    # Clip the pixels after every step to the valid range in the teacher's input space, as zju-vipa
    # `clip_images`: per channel [(0 - mean) / std, (1 - mean) / std] of the run's normalisation (recipe
    # image_mean / image_std, SynthesisContext). pixel_min / pixel_max (one value for all channels)
    # override it, either side alone too; clip_pixels false: no clipping (NVlabs' CIFAR script).
    clip_pixels: bool = True
    pixel_min: Optional[float] = None
    pixel_max: Optional[float] = None
    # The pool: every round's batch, FIFO. Default 51200 = 200 rounds x 256, a whole zju-vipa run
    # (its ImagePool is unbounded). Where it lives: replay_storage / replay_dir / replay_dtype
    # (ReplayStorageConfig: memory, float16; uint8 quantises the clip range).
    pool_capacity: int = 51200
    # KD-time augmentation of pool samples: the data set's training transform, RandomCrop(pad 4) +
    # horizontal flip (zju-vipa datafree_kd.py, implementations.md 1.1).
    kd_augment: bool = True
    kd_augment_padding: int = 4
    # zju-vipa puts the student in eval() for the adversarial term (deepinversion.py `student.eval()`).
    student_mode_in_synthesis: Literal["train", "eval"] = "eval"
    # Batch statistics over all ranks' synthesis batches (DESIGN.md fact 6; NVlabs/DeepInversion#16).
    distributed_bn_statistics: bool = False

    def validate(self) -> None:
        for name in ("student_steps_per_round", "per_device_synthesis_batch_size", "synthesis_iterations",
                     "pool_capacity"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("temperature", "pixel_lr", "adversarial_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        weights = dict(bn_weight=self.bn_weight, one_hot_weight=self.one_hot_weight,
                       adversarial_weight=self.adversarial_weight, tv_weight=self.tv_weight, l2_weight=self.l2_weight)
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 switches the term off), got {value}")
        if not any(weights.values()):
            raise ConfigError(f"DeepInversion needs at least one positive loss weight ({', '.join(weights)})")
        if self.jitter is not None and self.jitter < 0:
            raise ConfigError(f"jitter must be >= 0 pixels (or None for 1/8 of the side), got {self.jitter}")
        if self.kd_augment_padding < 0:
            raise ConfigError(f"kd_augment_padding must be >= 0, got {self.kd_augment_padding}")
        if (self.pixel_min is not None and self.pixel_max is not None) and self.pixel_min >= self.pixel_max:
            raise ConfigError(f"pixel_min ({self.pixel_min}) must be below pixel_max ({self.pixel_max})")
        if not self.clip_pixels and (self.pixel_min is not None or self.pixel_max is not None):
            raise ConfigError("pixel_min / pixel_max are a clip range, but clip_pixels is false: drop them, or set "
                              "clip_pixels true")
        self.validate_replay_storage()


# --- the read side -------------------------------------------------------------------------------------
class AugmentedReplaySource(ReplaySource):
    """Uniform pool samples, then random crop with padding + horizontal flip per sample, all drawn
    from the source's own generator (so its state_dict, the generator state, covers both)."""

    def __init__(self, buffer: ReplayBuffer, batch_size: int, rng: torch.Generator, padding: int) -> None:
        super().__init__(buffer, batch_size, rng)
        self.padding = padding

    @torch.no_grad()
    def next_batch(self) -> SyntheticBatch:
        batch = super().next_batch()
        images = random_crop_with_padding(batch.images, self.padding, self.rng)
        batch.images = random_horizontal_flip(images, self.rng)
        return batch


# --- the method ---------------------------------------------------------------------------------------
class DeepInversion(Synthesizer):
    name = "deepinversion"
    config_class = DeepInversionConfig
    paper = ("Yin et al., Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR 2020 "
             "(arXiv:1912.08795)")
    config: DeepInversionConfig
    needs_batchnorm_teacher = True

    def __init__(self, config: DeepInversionConfig, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(config, teacher, **kwargs)
        config.validate()
        if config.bn_weight > 0 and not has_batchnorm(teacher):
            raise ConfigError(
                f"DeepInversion matches the teacher's BatchNorm statistics; {type(teacher).__name__} has no "
                "BatchNorm2d layer (LeNet-5 has none): use a teacher with BatchNorm, or a method without a "
                "BN-statistics term (e.g. dfad)")
        device = self.context.device
        b = config.per_device_synthesis_batch_size
        # The optimised pixels of the current round (re-drawn in place each round; kept between rounds
        # only so that tests and callbacks can inspect the last round's final iterate and gradient).
        self.pixels = torch.zeros((b, *self.image_shape), device=device, requires_grad=True)
        self.clip_low, self.clip_high = self.clip_range()
        # The pool holds the teacher-space images; uint8 quantises the clip range's span.
        if config.replay_dtype == "uint8" and (self.clip_low is None or self.clip_high is None):
            raise ConfigError("replay_dtype uint8 quantises a known value range, but these pixels are not clipped "
                              "to one: set image_mean / image_std (or pixel_min and pixel_max), or use float16")
        value_range = (0.0, 1.0)
        if self.clip_low is not None and self.clip_high is not None:
            value_range = (float(self.clip_low.min()), float(self.clip_high.max()))
        self.pool = config.build_pool(config.pool_capacity, self.context, value_range=value_range)
        self.rng = self.context.make_rng(stream=0)  # pixels, targets, jitter and flips
        side = min(self.image_shape[1:])
        self.jitter = config.jitter if config.jitter is not None else int(side * 0.125)

    # ---------------------------------------------------------------------------------------------
    def loss_terms(self, images: Tensor, targets: Tensor, student: nn.Module) -> dict[str, Tensor]:
        """The unweighted terms of one iteration on (already jittered) `images`. Terms whose weight is 0
        are left out (the student is not even run without the adversarial term, as zju-vipa)."""
        cfg, terms = self.config, {}
        with self.context.autocast():
            if cfg.bn_weight > 0:
                with BatchNormStatistics(self.teacher, first_layer_weight=cfg.first_bn_weight,
                                         distributed=cfg.distributed_bn_statistics) as bn:
                    teacher_logits = logits_of(self.teacher(images))
                    terms["bn_stats"] = bn.loss()
            else:
                teacher_logits = logits_of(self.teacher(images))
            student_logits = logits_of(student(images)) if cfg.adversarial_weight > 0 else None
        if cfg.one_hot_weight > 0:
            terms["one_hot"] = F.cross_entropy(teacher_logits.float(), targets)
        if student_logits is not None:
            terms["adversarial"] = -js_divergence_clamped(student_logits, teacher_logits, cfg.adversarial_temperature)
        return terms

    def prior_terms(self, pixels: Tensor) -> dict[str, Tensor]:
        """Image priors on the un-jittered pixels (zju-vipa computes them on `inputs`, not the view)."""
        cfg, terms = self.config, {}
        if cfg.tv_weight > 0:
            terms["tv"] = total_variation_l1(pixels)
        if cfg.l2_weight > 0:
            terms["l2"] = image_l2(pixels)
        return terms

    def term_weights(self) -> dict[str, float]:
        cfg = self.config
        return {"bn_stats": cfg.bn_weight, "one_hot": cfg.one_hot_weight, "adversarial": cfg.adversarial_weight,
                "tv": cfg.tv_weight, "l2": cfg.l2_weight}

    def _views(self, iterations: int) -> list[tuple[int, int, bool]]:
        """All (row shift, column shift, flip) draws of a round at once: one host sync per round."""
        draws = torch.randint(-self.jitter, self.jitter + 1, (iterations, 2), generator=self.rng,
                              device=self.rng.device)
        flips = torch.rand(iterations, generator=self.rng, device=self.rng.device) < 0.5
        rows = torch.cat([draws, flips.long()[:, None]], dim=1).tolist()
        return [(dy, dx, bool(f) and self.config.flip) for dy, dx, f in rows]

    def _view(self, pixels: Tensor, dy: int, dx: int, flip: bool) -> Tensor:
        view = torch.roll(pixels, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else pixels
        return view.flip(-1) if flip else view

    def clip_range(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(low, high) bounds of the pixels as (1, C, 1, 1) tensors (None: that side is not clipped): explicit
        pixel_min / pixel_max, else per channel (0 - mean) / std and (1 - mean) / std of the run's
        normalisation (zju-vipa clip_images), else nothing."""
        cfg, channels, device = self.config, self.image_shape[0], self.context.device
        if not cfg.clip_pixels:
            return None, None
        if cfg.pixel_min is not None or cfg.pixel_max is not None:
            def bound(value: Optional[float]) -> Optional[Tensor]:
                return None if value is None else torch.full((1, channels, 1, 1), float(value), device=device)
            return bound(cfg.pixel_min), bound(cfg.pixel_max)
        normalization = self.context.normalization(channels)
        if normalization is None:
            return None, None
        mean, std = normalization
        return (0.0 - mean) / std, (1.0 - mean) / std

    def _clip(self) -> None:
        if self.clip_low is not None or self.clip_high is not None:
            with torch.no_grad():
                self.pixels.clamp_(min=self.clip_low, max=self.clip_high)

    def _scope(self, student: nn.Module) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(frozen(student))
        stack.enter_context(training_mode(student, self.config.student_mode_in_synthesis == "train"))
        stack.enter_context(training_mode(self.teacher, False))
        return stack

    def _pixel_step(self, loss: Tensor, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """One Adam step on this rank's own pixels. Unlike Synthesizer._step there is no gradient
        all-reduce: the pixels are per rank, averaging their gradients would mix different images."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        cfg = self.config
        lr = cfg.pixel_lr * (lr_scale if cfg.pixel_lr_follows_schedule else 1.0)
        b = cfg.per_device_synthesis_batch_size
        with torch.no_grad():
            self.pixels.copy_(torch.randn(self.pixels.shape, generator=self.rng, device=self.rng.device))
        self.pixels.grad = None
        targets = torch.randint(0, self.num_classes, (b,), generator=self.rng, device=self.rng.device)
        targets = targets.sort().values  # zju-vipa sorts them "for better visualization"
        optimizer = torch.optim.Adam([self.pixels], lr=lr, betas=(cfg.pixel_beta1, cfg.pixel_beta2))
        weights = self.term_weights()
        best_loss = torch.full((), float("inf"), device=self.pixels.device)
        best_images = self.pixels.detach().clone()
        # iterations + 1 evaluations: the last one scores the final iterate (no step after it).
        views = self._views(cfg.synthesis_iterations + 1)
        with self._scope(student):
            for it, (dy, dx, flip) in enumerate(views):
                terms = self.loss_terms(self._view(self.pixels, dy, dx, flip), targets, student)
                terms.update(self.prior_terms(self.pixels))
                loss = sum(weights[name] * term for name, term in terms.items())
                detached = loss.detach().float()
                better = detached < best_loss  # on device: no .item() per iteration
                best_images = torch.where(better, self.pixels.detach(), best_images)
                best_loss = torch.where(better, detached, best_loss)
                if it == cfg.synthesis_iterations:
                    break
                self._pixel_step(loss, optimizer, lr)
                self._clip()
        self.pool.add(best_images)
        self.rounds += 1
        losses = {k: v.detach() for k, v in terms.items()}
        losses["total"] = detached          # the final iterate's loss
        losses["best_total"] = best_loss    # the loss of the images added to the pool
        return SynthesisOutput(losses=losses, images=best_images, targets=targets.to(best_images.device))

    # ---------------------------------------------------------------------------------------------
    def build_source(self, batch_size: int) -> ReplaySource:
        rng = self.context.make_rng(stream=1)
        if self.config.kd_augment:
            return AugmentedReplaySource(self.pool, batch_size, rng, self.config.kd_augment_padding)
        return ReplaySource(self.pool, batch_size, rng)

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "pool": self.pool.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.pool.load_state_dict(state["pool"])
