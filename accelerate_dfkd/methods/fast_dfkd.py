"""FastDFKD (Fast-k): Up to 100x Faster Data-Free Knowledge Distillation (Fang et al., AAAI 2022,
arXiv:2112.06253; shared/papers/fastdfkd-aaai2022.md).

A meta generator learns "common features": every round a copy of it and a fresh per-sample latent z
are adapted for only k = `generator_steps` inner Adam steps to the round's inversion loss (random
target labels, momentum BatchNorm statistics, the decision-adversarial term), the best inner iterate
goes into a pool, and the meta generator is moved so that the next k-step adaptation starts from a
better point (first-order MAML: the sum of the inner gradients; or Reptile: the parameter
difference). The student distils on uniform samples of the whole pool (KL at T = 20).
As in fast_meta.py, the iterates scored are the images each inner step starts from, and the lowest-loss one
enters the pool; the k-th step's result is not scored, so a round costs exactly k teacher forwards and k
inner optimizer steps (the last step still matters for Reptile).

Symbol map (paper -> zju-vipa Fast-Datafree `datafree/synthesis/fast_meta.py` -> here):
    G(z; theta_hat), the meta generator       -> `generator`          -> self.generator (sigmoid_generator)
    z_i^0 (fresh per sample, N(0, I))         -> `z`                  -> drawn per round from this rank's stream
    U^k (Eq. 6), k inner steps                 -> `iterations`/g_steps -> generator_steps, a fresh inner Adam
    alpha (inner step sizes)                   -> lr_g, lr_z           -> generator_lr, latent_lr
    Eq. 9 first-order gradient (sum over the   -> `is_maml=1`          -> meta_update="fomaml"
      inner trajectory, as the code runs it)       `fomaml_grad`
    Eq. 10 Reptile theta_hat - theta*         -> `is_maml=0`          -> meta_update="reptile"
    eta (meta step size)                       -> lr_g * g_steps       -> meta_lr (None: generator_lr * generator_steps)
    L_feat with momentum (Eq. 15), m           -> bn, bn_mmt           -> bn_weight, bn_momentum (hooks.BNMomentumState)
    L_cls = CE(f_t(x), c)                     -> oh                   -> one_hot_weight
    L_adv (Eq. 13: -JSD; the code, followed    -> adv                  -> adversarial_weight
      here: decision adversarial, masked KL)                           (losses.decision_adversarial)
    normalizer (data set mean/std)             -> `normalizer`         -> the run's image_mean / image_std
                                                                       (SynthesisContext)
    D' (the synthetic set)                    -> ImagePool of PNGs    -> ReplayBuffer of float16 [0, 1] tensors
                                                                       (replay_storage / replay_dtype)
    warm-up epochs (synthesis, no KD)          -> --warmup 20          -> warmup_rounds (the Distiller honours it)
    t student steps per round (Alg. 1 l.17)    -> kd_steps 400         -> student_steps_per_round

Defaults: `scripts/fast_cifar.sh` (Fast-5, ResNet-34 -> ResNet-18; shared/reference/implementations.md
section 2.7 and table 3) unless a field says otherwise. Deviations, on purpose:
  * images never go through PNG files: the pool keeps the [0, 1] images as float16 tensors (in memory,
    or on disk with `replay_storage: disk`; `replay_dtype: uint8` is the PNGs' quantisation); the
    student's source applies the reference's KD transform (random crop with padding + flip, then the
    data set's normalisation) on tensors;
  * the random draws (z, labels, augmentations, generator re-initialisation) come from torch.Generators
    (this rank's stream; the re-initialisation from a stream shared by all ranks so the meta generator
    stays one model), not from the global RNG;
  * under DDP the meta gradient is averaged over ranks (one all-reduce per round), and the BatchNorm
    statistics can be those of the global synthesis batch (`distributed_bn_statistics`); the reference
    is not DDP-aware (implementations.md 2.10.4);
  * Reptile uses the plain difference theta_hat - theta* of Eq. 10; the code multiplies it by 67, which
    under Adam only changes the relative size of Adam's epsilon;
  * (from the paper, as the code does) Eq. 15 as the code computes it (hooks.BatchNormStatistics): the compared statistics are
    (1 - m) * batch + m * accumulated with m = 0.9, so a batch fixes 10 % of the remaining gap; the
    paper's Eq. 15 writes the two weights the other way round;
  * the adversarial term starts with the first round followed by student steps (round index >=
    warmup_rounds); the reference's 1-based counter (`ep >= warmup`) switches it on one round earlier,
    in the last warm-up round, against a student that has not been trained yet.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..config import ConfigError, MethodConfig
from ..hooks import BatchNormStatistics, BNMomentumState, frozen, has_batchnorm, training_mode
from ..synthesis.generative import build_checked_generator
from ..synthesis.augment import Augment
from ..synthesis.base import SynthesisOutput, Synthesizer, SyntheticBatch
from ..synthesis.replay import ReplayStorageConfig
from ..synthesis.sources import ReplaySource
from ..utils import logits_of


# --- config ------------------------------------------------------------------------------------------
@dataclass
class FastDFKDConfig(ReplayStorageConfig, MethodConfig):
    # Student: KL at T = 20 on pool samples (fast_cifar.sh --T 20), 400 student steps per synthesis round
    # (kd_steps = ep_steps = 400), after 20 synthesis-only warm-up rounds (--warmup 20).
    student_loss: Literal["kl", "l1"] = "kl"
    temperature: float = 20.0
    student_steps_per_round: int = 400
    warmup_rounds: int = 20
    per_device_synthesis_batch_size: int = 256      # fast_cifar.sh --batch_size 256
    # The zju-vipa Generator (sigmoid output in [0, 1]), nz 256, ngf 64 (implementations.md section 4).
    generator: str = "sigmoid_generator"
    nz: int = 256
    ngf: int = 64
    # (No normalisation field: a [0, 1] "pixel" generator's images are normalised after augmentation, as the
    # reference's `normalizer`, with the run's image_mean / image_std (SynthesisContext); a generator with
    # standardised output, generator_a, does without.)
    # k, the inner steps of one round (Fast-5), and the inner Adam's step sizes for the generator copy and
    # z (fast_cifar.sh Fast-2/5/10: lr_g 5e-3/3e-3/2e-3, lr_z 0.015/0.01/0.01), betas (0.5, 0.999)
    # (fast_meta.py, for the inner and the meta Adam).
    generator_steps: int = 5
    generator_lr: float = 3e-3
    latent_lr: float = 0.01
    generator_beta1: float = 0.5
    generator_beta2: float = 0.999
    # "fomaml": the meta gradient is the sum of the inner gradients (fast_meta.py `fomaml_grad`, is_maml 1,
    # every shipped script); "reptile": theta_hat - theta* (Eq. 10, is_maml 0, the ImageNet logs).
    meta_update: Literal["fomaml", "reptile"] = "fomaml"
    # Meta Adam step size; None: generator_lr * generator_steps (fast_meta.py). The ImageNet script
    # sets it on its own (lr_g_meta 1e-4).
    meta_lr: Optional[float] = None
    # Inversion loss weights (fast_cifar.sh, ResNet-34 -> ResNet-18: --bn 10 --oh 0.5 --adv 1.33;
    # VGG-11: adv 1.0; WRN-40-2: oh 0.4, adv 1.1) and the BN-statistics momentum (--bn_mmt 0.9, Eq. 15).
    bn_weight: float = 10.0
    bn_momentum: float = 0.9
    one_hot_weight: float = 0.5
    adversarial_weight: float = 1.33
    # Re-initialise the meta generator's first Linear and first BatchNorm once, at the round
    # `warmup_rounds + reset_first_layers_round` (1-based), as fast_meta.py `reset_l0` does at
    # `ep == 120 + warmup` (--reset_l0 1).
    reset_first_layers: bool = True
    reset_first_layers_round: int = 120
    # Synthesis-time augmentation of the generator's images before the teacher: kornia RandomCrop(pad 4)
    # + RandomHorizontalFlip (CIFAR); set the scale to [0.75, 1.0] for the ImageNet RandomResizedCrop.
    synthesis_augment_padding: int = 4
    synthesis_resized_crop_scale: Optional[list[float]] = None
    synthesis_flip: bool = True
    # The pool: every round's best batch, FIFO. 56320 = 220 rounds x 256, a whole reference run (its
    # ImagePool is unbounded; warm-up rounds add to it too). Where it lives: replay_storage / replay_dir /
    # replay_dtype (ReplayStorageConfig: memory, float16; "disk" for pools larger than memory, "uint8" for
    # the reference's 8-bit PNG quantisation of [0, 1] pixels).
    pool_capacity: int = 56320
    # KD-time augmentation of pool samples: the data set's training transform (RandomCrop(pad 4) + flip;
    # datafree_kd.py), or a random resized crop with this scale.
    kd_augment: bool = True
    kd_augment_padding: int = 4
    kd_resized_crop_scale: Optional[list[float]] = None
    # fast_meta.py puts the student in eval() for the adversarial term.
    student_mode_in_synthesis: Literal["train", "eval"] = "eval"
    # Batch statistics over all ranks' synthesis batches (DESIGN.md fact 6; NVlabs/DeepInversion#16).
    distributed_bn_statistics: bool = False

    def validate(self) -> None:
        for name in ("student_steps_per_round", "per_device_synthesis_batch_size", "generator_steps", "nz", "ngf",
                     "pool_capacity", "reset_first_layers_round"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("temperature", "generator_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.latent_lr < 0:
            raise ConfigError(f"latent_lr must be >= 0 (0 keeps z at its draw), got {self.latent_lr}")
        if self.meta_lr is not None and self.meta_lr <= 0:
            raise ConfigError(f"meta_lr must be positive (or None for generator_lr * generator_steps), "
                              f"got {self.meta_lr}")
        if self.warmup_rounds < 0:
            raise ConfigError(f"warmup_rounds must be >= 0, got {self.warmup_rounds}")
        for name in ("generator_beta1", "generator_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ConfigError(f"bn_momentum must lie in [0, 1) (0: the plain BN-statistics loss), "
                              f"got {self.bn_momentum}")
        weights = dict(bn_weight=self.bn_weight, one_hot_weight=self.one_hot_weight,
                       adversarial_weight=self.adversarial_weight)
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 switches the term off), got {value}")
        if not any(weights.values()):
            raise ConfigError(f"FastDFKD needs at least one positive loss weight ({', '.join(weights)})")
        self.validate_replay_storage()
        for name in ("synthesis_augment_padding", "kd_augment_padding"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("synthesis_resized_crop_scale", "kd_resized_crop_scale"):
            scale = getattr(self, name)
            if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
                raise ConfigError(f"{name} must be [low, high] with 0 < low <= high <= 1 (e.g. [0.75, 1.0]), "
                                  f"got {scale}")

    @property
    def effective_meta_lr(self) -> float:
        return self.meta_lr if self.meta_lr is not None else self.generator_lr * self.generator_steps


# --- helpers --------------------------------------------------------------------------------------------
class Normalize:
    """x -> (x - mean) / std per channel: the data set's normaliser between [0, 1] images and the teacher,
    from (1, C, 1, 1) tensors (SynthesisContext.normalization). The identity when no statistics are given
    (a generator whose output is already standardised)."""

    def __init__(self, mean: Optional[Tensor] = None, std: Optional[Tensor] = None) -> None:
        self.mean, self.std = mean, std

    def __call__(self, images: Tensor) -> Tensor:
        if self.mean is None:
            return images
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


def build_fast_generator(config: FastDFKDConfig, image_shape: Sequence[int]) -> nn.Module:
    """The meta generator, refusing shapes it cannot make and output spaces FastDFKD does not handle."""
    generator = build_checked_generator(config.generator, nz=config.nz, ngf=config.ngf, image_shape=image_shape,
                                        output_spaces=("pixel", "normalized"), method="FastDFKD",
                                        use="sigmoid_generator (the reference's) or generator_a")
    if config.reset_first_layers and first_layers(generator) is None:
        raise ConfigError(f"generator {config.generator!r} has no Linear + BatchNorm2d input layers to re-initialise: "
                          "set reset_first_layers false")
    return generator


def first_layers(generator: nn.Module) -> Optional[tuple[nn.Linear, nn.BatchNorm2d]]:
    """The generator's input projection and its first BatchNorm (zju-vipa `l1.0` and `conv_blocks.0`)."""
    linear = next((m for m in generator.modules() if isinstance(m, nn.Linear)), None)
    norm = next((m for m in generator.modules() if isinstance(m, nn.BatchNorm2d) and m.affine), None)
    return None if linear is None or norm is None else (linear, norm)


@torch.no_grad()
def reset_first_layers(generator: nn.Module, rng: torch.Generator) -> None:
    """fast_meta.py `reset_l0`: weights ~ N(0, 0.02), biases 0, for the first Linear and the first BatchNorm.

    The BatchNorm weight is drawn around 0 too, as the reference does (not N(1, 0.02) as its unused
    `reset_bn`). Kept on purpose: that BatchNorm feeds a bias-free convolution and then a BatchNorm on batch
    statistics, which cancels any common scale of its weight, so a zero-mean draw is a genuine
    re-initialisation (random per-channel signs and relative scales), where a draw around 1 would leave
    the layer close to an identity. Side effect: the small weights move fast under Adam's fixed-size steps.
    """
    for module in first_layers(generator):
        draw = torch.randn(module.weight.shape, generator=rng, device=rng.device) * 0.02
        module.weight.copy_(draw.to(module.weight.device))
        module.bias.zero_()


# --- the read side -------------------------------------------------------------------------------------
class AugmentAndNormalize:
    """Mixin for a source that reads stored [0, 1] images: the KD augmentation (random crop with padding
    or random resized crop, then a flip), then the teacher's normalisation, on every batch it reads."""

    def __init__(self, buffer: Any, batch_size: int, rng: torch.Generator, augment: Optional[Augment],
                 normalize: Callable[[Tensor], Tensor]) -> None:
        super().__init__(buffer, batch_size, rng)
        self.augment, self.normalize = augment, normalize

    @torch.no_grad()
    def next_batch(self) -> SyntheticBatch:
        batch = super().next_batch()
        images = self.augment(batch.images) if self.augment is not None else batch.images
        batch.images = self.normalize(images)
        return batch


class NormalizedReplaySource(AugmentAndNormalize, ReplaySource):
    """Uniform pool samples, augmented and normalised: the reference's pool DataLoader with the data
    set's training transform, on tensors. All draws come from the source's generator."""


# --- the method ---------------------------------------------------------------------------------------
class FastDFKD(Synthesizer):
    name = "fast_dfkd"
    config_class = FastDFKDConfig
    paper = ("Fang et al., Up to 100x Faster Data-Free Knowledge Distillation, AAAI 2022 (arXiv:2112.06253)")
    config: FastDFKDConfig
    needs_batchnorm_teacher = True

    def __init__(self, config: FastDFKDConfig, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(config, teacher, **kwargs)
        config.validate()
        if config.bn_weight > 0 and not has_batchnorm(teacher):
            raise ConfigError(
                f"FastDFKD matches the teacher's BatchNorm statistics; {type(teacher).__name__} has no BatchNorm2d "
                "layer (LeNet-5 has none): use a teacher with BatchNorm, or a method without a BN-statistics term")
        device = self.context.device
        self.generator = build_fast_generator(config, self.image_shape).to(device)  # the meta generator
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.effective_meta_lr,
                                               betas=(config.generator_beta1, config.generator_beta2))
        self.normalize = Normalize()  # generator_a: already in the teacher's input space
        if self.generator.output_space == "pixel":  # the reference's `normalizer`, from the run's normalisation
            self.normalize = Normalize(*self.context.normalization(
                self.image_shape[0], required_by=f"FastDFKD's generator {config.generator!r}"))
        self.bn_state = BNMomentumState()  # the accumulated statistics of Eq. 15, across rounds
        # Every round's best batch, as the generator made it: [0, 1] pixels, or standardised (generator_a).
        if config.replay_dtype == "uint8" and self.generator.output_space != "pixel":
            raise ConfigError(f"replay_dtype uint8 quantises [0, 1] pixels; generator {config.generator!r} makes "
                              "standardised images: use replay_dtype float16 (or sigmoid_generator)")
        self.pool = config.build_pool(config.pool_capacity, self.context)
        self.rng = self.context.make_rng(stream=0)  # z, target labels, synthesis augmentation
        self.augment = Augment(self.rng, padding=config.synthesis_augment_padding,
                               flip_p=0.5 if config.synthesis_flip else 0.0,
                               resized_crop_scale=config.synthesis_resized_crop_scale)
        self.inner_steps = 0  # inner optimizer steps ever taken (k per round)

    @classmethod
    def check_image_shape(cls, config: FastDFKDConfig, image_shape: tuple[int, int, int]) -> None:
        config.validate()
        build_fast_generator(config, image_shape)

    # ---------------------------------------------------------------------------------------------
    def adversarial_active(self, round_index: int) -> bool:
        """The adversarial term is gated by the warm-up: it needs a student that is being trained."""
        return self.config.adversarial_weight > 0 and round_index >= self.config.warmup_rounds

    def term_weights(self) -> dict[str, float]:
        cfg = self.config
        return {"bn_stats": cfg.bn_weight, "one_hot": cfg.one_hot_weight, "adversarial": cfg.adversarial_weight}

    def loss_terms(self, views: Tensor, targets: Tensor, student: nn.Module, bn: Optional[BatchNormStatistics],
                   adversarial: bool) -> dict[str, Tensor]:
        """The unweighted inversion terms of one inner step on the teacher-space `views` (Eq. 13/15); terms
        whose weight is 0 are left out, and the student is run only for the adversarial term."""
        cfg, terms = self.config, {}
        teacher_logits = logits_of(self.teacher(views))
        if bn is not None:
            terms["bn_stats"] = bn.loss()
        if cfg.one_hot_weight > 0:
            terms["one_hot"] = F.cross_entropy(teacher_logits.float(), targets)
        if adversarial:
            terms["adversarial"] = losses.decision_adversarial(logits_of(student(views)), teacher_logits)
        return terms

    def _scope(self, student: nn.Module) -> tuple[contextlib.ExitStack, Optional[BatchNormStatistics]]:
        stack = contextlib.ExitStack()
        stack.enter_context(frozen(student))
        stack.enter_context(training_mode(student, self.config.student_mode_in_synthesis == "train"))
        stack.enter_context(training_mode(self.teacher, False))
        bn = None
        if self.config.bn_weight > 0:
            # One hook scope for the whole round: the momentum update reads its last forward's statistics.
            bn = stack.enter_context(BatchNormStatistics(self.teacher, momentum=self.config.bn_momentum,
                                                         state=self.bn_state,
                                                         distributed=self.config.distributed_bn_statistics))
        return stack, bn

    def _inner_backward(self, loss: Tensor, inner: torch.optim.Optimizer) -> bool:
        """Backward of one inner step, gradients unscaled under fp16; False if they overflowed."""
        inner.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            return True
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(inner)
        return all(torch.isfinite(p.grad).all() for group in inner.param_groups for p in group["params"]
                   if p.grad is not None)

    def _inner_step(self, inner: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            inner.step()
        else:
            self.scaler.step(inner)
            self.scaler.update()
        self.inner_steps += 1

    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        """One round: k inner steps from the meta generator on fresh z, the best iterate into the pool, one
        meta step. The inner and meta step sizes do not follow the student's schedule (as the reference)."""
        cfg = self.config
        round_index = self.rounds
        if cfg.reset_first_layers and round_index + 1 == cfg.warmup_rounds + cfg.reset_first_layers_round:
            # A stream shared by every rank (no process index), so the meta generator stays one model.
            shared = torch.Generator(device=self.context.device)
            shared.manual_seed(self.context.seed + 7_000_003 * (round_index + 1))
            reset_first_layers(self.generator, shared)
        adversarial = self.adversarial_active(round_index)
        b = cfg.per_device_synthesis_batch_size
        device = self.rng.device
        z = torch.randn(b, cfg.nz, generator=self.rng, device=device).requires_grad_(True)
        targets = torch.randint(0, self.num_classes, (b,), generator=self.rng, device=device)
        fast = copy.deepcopy(self.generator).train()  # theta^0 = theta_hat, weights and BN buffers
        inner = torch.optim.Adam([{"params": list(fast.parameters())}, {"params": [z], "lr": cfg.latent_lr}],
                                 lr=cfg.generator_lr, betas=(cfg.generator_beta1, cfg.generator_beta2))
        meta_params = list(self.generator.parameters())
        meta_grads = [torch.zeros_like(p) for p in meta_params]
        meta_finite = True
        weights = self.term_weights()
        best_loss, best_images = torch.full((), float("inf"), device=device), None
        scope, bn = self._scope(student)
        with scope:
            for _ in range(cfg.generator_steps):
                with self.context.autocast():
                    images = fast(z)
                    views = self.normalize(self.augment(images))
                    terms = self.loss_terms(views, targets, student, bn, adversarial)
                loss = sum(weights[name] * term for name, term in terms.items())
                detached = loss.detach().float()
                # The images the loss was computed on (before augmentation), lowest loss kept (fast_meta.py).
                if best_images is None:
                    best_images, best_loss = images.detach().float(), detached
                else:
                    better = detached < best_loss  # on device: no host sync per step
                    best_images = torch.where(better, images.detach().float(), best_images)
                    best_loss = torch.where(better, detached, best_loss)
                finite = self._inner_backward(loss, inner)
                if cfg.meta_update == "fomaml":
                    # Eq. 9, as fomaml_grad: the meta gradient is the sum of the copy's gradients along the way.
                    meta_finite = meta_finite and finite
                    for acc, p in zip(meta_grads, fast.parameters()):
                        if p.grad is not None:
                            acc.add_(p.grad)
                self._inner_step(inner)
            if bn is not None and cfg.bn_momentum > 0:
                bn.update_momentum()  # Eq. 14 on the accumulators, from the last inner forward
        if cfg.meta_update == "reptile":
            meta_grads = [(m.detach() - p.detach()) for m, p in zip(meta_params, fast.parameters())]  # Eq. 10
        self._meta_step(meta_params, meta_grads, meta_finite)
        self.pool.add(best_images)
        self.rounds += 1
        out = {k: v.detach() for k, v in terms.items()}
        out["total"] = detached          # the last inner iterate's loss
        out["best_total"] = best_loss    # the loss of the images added to the pool
        return SynthesisOutput(losses=out, images=self.normalize(best_images), targets=targets)

    def _meta_step(self, params: list[nn.Parameter], grads: list[Tensor], finite: bool) -> None:
        """One meta Adam step with the gradients averaged over ranks; skipped when fp16 overflowed."""
        for p, g in zip(params, grads):
            p.grad = g
        self.context.all_reduce_gradients(params)
        if self.scaler is not None:
            finite = all(torch.isfinite(p.grad).all() for p in params) and finite
            if not finite:
                return
        self.meta_optimizer.step()

    # ---------------------------------------------------------------------------------------------
    def build_source(self, batch_size: int) -> NormalizedReplaySource:
        cfg = self.config
        rng = self.context.make_rng(stream=1)
        augment = None
        if cfg.kd_augment:
            augment = Augment(rng, padding=cfg.kd_augment_padding, resized_crop_scale=cfg.kd_resized_crop_scale)
        return NormalizedReplaySource(self.pool, batch_size, rng, augment, self.normalize)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"meta": self.meta_optimizer}

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "pool": self.pool.state_dict(), "bn_momentum": self.bn_state.state_dict(),
                "inner_steps": self.inner_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.pool.load_state_dict(state["pool"])
        self.bn_state.load_state_dict(state["bn_momentum"])
        self.inner_steps = state["inner_steps"]
