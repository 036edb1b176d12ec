"""CMI: Contrastive Model Inversion for Data-Free Knowledge Distillation (Fang et al., IJCAI 2021,
arXiv:2105.08584).

Every round a small generator is re-initialised and optimised, together with one latent per sample,
for `synthesis_iterations` Adam steps, so that its batch (a) inverts the teacher as DeepInversion
does (BatchNorm statistics, cross-entropy to random target labels, the decision-adversarial term
against the student) and (b) is distinguishable, instance by instance, from every batch made before:
a contrastive loss over teacher features of two augmented views, with the features of earlier
batches as cached negatives in a memory bank. The best iterate goes into a pool (a ReplayBuffer of
[0, 1] pixel tensors, never PNG files) from which the student distils with the data set's training
augmentation.

Symbol map (paper / zju-vipa CMI `datafree/synthesis/contrastive.py` `CMISynthesizer` -> here):
    G, z (re-initialised every round)        -> self.generator (`reset_model`: conv/linear N(0, 0.02),
                                                BN weight N(1, 0.02), biases 0), per-sample latents z
    Adam(lr_g, betas (0.5, 0.999)) on G + z  -> generator_lr, generator_beta1/2 (one Adam, fresh per round)
    global view: RandomCrop(pad 4) + flip    -> augment_padding; random_crop_with_padding + flip
    local view: RandomResizedCrop([0.25, 1]) + flip -> local_crop_scale; random_resized_crop + flip
    normalizer (data set mean/std)           -> the run's image_mean / image_std (SynthesisContext; the
                                                generator emits [0, 1] pixels)
    bn * R_BN (`DeepInversionHook`)          -> `bn_stats` term, bn_weight (hooks.BatchNormStatistics,
                                                on the global view)
    oh * CE(t(global), targets)              -> `one_hot` term, one_hot_weight (random sorted targets)
    adv * -(mask KL(t || s)) ("decision adversarial") -> `adversarial` term, adversarial_weight
                                                (losses.decision_adversarial, global view)
    cr * L_cr, cr_T                          -> `contrastive` term, contrastive_weight, contrastive_temperature
    InstanceMeanHook on every teacher BN input -> per-sample spatial means of every BatchNorm2d input,
                                                concatenated (`instance_features`)
    MLPHead(d, head_dim): Linear-ReLU-Linear, L2 normalised -> ProjectionHead, head_dim
    optimizer_head = Adam(head, lr_g)        -> its own persistent Adam, head_lr (None: generator_lr)
    MemoryBank(40960, 2d) of [local, global] features; n_neg = 4096 negatives per iteration
                                             -> FeatureMemoryBank(memory_bank_size), negatives
    ImagePool + DataLoader(shuffle) + the training transform
                                             -> ReplayBuffer (pool_capacity, replay_storage / replay_dtype)
                                                + uniform ReplaySource + crop/flip + normalisation
    kd_steps = ep_steps = 400                -> student_steps_per_round

The contrastive loss (the reference's "naive implementation"): the head projects
[local, cached_local, global, cached_global]; logits = proj_local . stop_grad(proj_global)^T / cr_T,
the target of row i is column i (instance discrimination); the per-row cross-entropy is averaged
separately over the current batch and over the cached rows and the two means are summed, "to avoid
too small gradients w.r.t. the generator". The gradient reaches the generator through the local
view only (the global projections are detached).

Defaults: the CMI repo's `scripts/cmi_cifar10.sh` (CIFAR-10 WRN-40-2 -> WRN-16-1) and `datafree_kd.py`
(bank_size 40960, n_neg 4096, head_dim 256, Generator nz 256 ngf 64), implementations.md 2.2 and table 3,
unless a field says otherwise. Deviations, on purpose:
  * the stored best iterate is chosen among all iterates including the final one (the reference
    scores an iterate before its step and never the last one), as methods/deepinversion.py does;
  * the generator's and the head's random draws (re-initialisation, latents, augmentations, negatives)
    come from this rank's torch.Generator, not the global RNG, so rounds are reproducible and resumable;
  * the decision-adversarial KL uses log-softmax on both sides (the reference's `F.kl_div` takes the
    log of a softmax), so it is exactly 0 with its gradient when the student equals the teacher;
  * under several processes every rank inverts its own batch with its own generator, head and bank
    (the reference is single-GPU); `distributed_bn_statistics` makes the BN term use global statistics.
The ResNet-34 special case of the reference (features from layer1..layer4 outputs instead of every BN
input) is not reproduced: every teacher gets the BN-input features.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..config import ConfigError, MethodConfig
from ..hooks import BatchNormStatistics, FeatureCapture, frozen, has_batchnorm, training_mode
from ..models import build_generator
from ..synthesis.generative import build_checked_generator
from ..synthesis.augment import random_crop_with_padding, random_horizontal_flip, random_resized_crop
from ..synthesis.base import SynthesisOutput, Synthesizer, SyntheticBatch
from ..synthesis.replay import ReplayBuffer, ReplayStorageConfig
from ..synthesis.sources import ReplaySource
from ..utils import logits_of

# --- loss terms and building blocks ------------------------------------------------------------------
def instance_discrimination(proj_local: Tensor, proj_global: Tensor, current: int, temperature: float) -> Tensor:
    """CMI's contrastive term on L2-normalised projections, rows [current batch; cached negatives].

    logits = proj_local . stop_grad(proj_global)^T / temperature, target of row i = column i; the
    per-row cross-entropy is averaged over the `current` rows and, where there are cached rows, over
    those too, and the two means are summed (zju-vipa contrastive.py)."""
    logits = proj_local.float() @ proj_global.float().detach().T / temperature
    per_row = F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device), reduction="none")
    if per_row.shape[0] > current:
        return per_row[:current].mean() + per_row[current:].mean()
    return per_row.mean()


class ProjectionHead(nn.Module):
    """zju-vipa `MLPHead`: Linear(d, d) -> ReLU -> Linear(d, head_dim), then L2 normalisation."""

    def __init__(self, dim_in: int, head_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1, p=2)


class FeatureMemoryBank:
    """A ring buffer of per-sample features (CMI's `MemoryBank`): each round adds the best iterate's
    [local, global] features; `sample(k)` draws min(k, filled) distinct entries uniformly."""

    def __init__(self, capacity: int, dim: int, device: torch.device) -> None:
        self.capacity, self.dim, self.device = capacity, dim, device
        self.features = torch.zeros(capacity, dim, device=device)
        self.updates = 0   # features ever added
        self._next = 0

    def __len__(self) -> int:
        return min(self.updates, self.capacity)

    def add(self, features: Tensor) -> None:
        features = features.detach().to(self.device, torch.float32)[-self.capacity:]
        slots = (self._next + torch.arange(features.shape[0], device=self.device)) % self.capacity
        self.features[slots] = features
        self._next = (self._next + features.shape[0]) % self.capacity
        self.updates += features.shape[0]

    def sample(self, k: int, rng: torch.Generator) -> Tensor:
        filled = len(self)
        if filled == 0 or k <= 0:
            return self.features[:0]
        index = torch.randperm(filled, generator=rng, device=rng.device)[: min(k, filled)]
        return self.features[index.to(self.device)]

    def state_dict(self) -> dict[str, Any]:
        return {"features": self.features[: len(self)].cpu().clone(), "updates": self.updates, "next": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stored = state["features"]
        if stored.shape[0] and stored.shape[1] != self.dim:
            raise ValueError(f"memory bank features have {stored.shape[1]} dimensions, this teacher gives {self.dim}")
        self.features.zero_()
        self.features[: stored.shape[0]] = stored.to(self.device, torch.float32)
        self.updates, self._next = state["updates"], state["next"]


def reset_generator_(generator: nn.Module, rng: torch.Generator) -> None:
    """zju-vipa `reset_model`: conv / transposed conv / linear weights N(0, 0.02), BatchNorm weights
    N(1, 0.02), every bias 0, drawn from `rng` (running statistics are left alone, as there; the
    generator always runs in train mode)."""
    with torch.no_grad():
        for m in generator.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=rng)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.normal_(m.weight, 1.0, 0.02, generator=rng)
                nn.init.zeros_(m.bias)


@contextlib.contextmanager
def instance_features(layers: list[nn.Module]):
    """Capture the inputs of `layers` during the forward passes in the block; `features()` gives
    their per-sample spatial means, concatenated (zju-vipa `InstanceMeanHook`). Hooks are removed on exit."""
    with contextlib.ExitStack() as stack:
        captures = [stack.enter_context(FeatureCapture(layer, capture="input")) for layer in layers]

        def features() -> Tensor:
            return torch.cat([c.value.float().mean(dim=(2, 3)) for c in captures], dim=1)

        yield features


# --- config ---------------------------------------------------------------------------------------------
@dataclass
class CMIConfig(ReplayStorageConfig, MethodConfig):
    student_loss: Literal["kl", "l1"] = "kl"
    temperature: float = 20.0                      # cmi_cifar10.sh --T 20
    student_steps_per_round: int = 400             # cmi_cifar10.sh --kd_steps 400 --ep_steps 400
    per_device_synthesis_batch_size: int = 256     # cmi_cifar10.sh --batch_size 256 (synthesis bs = bs)
    # The zju-vipa Generator (sigmoid output in [0, 1]) with nz 256, ngf 64 (datafree_kd.py, cmi branch).
    generator: str = "sigmoid_generator"
    nz: int = 256
    ngf: int = 64
    # Adam steps per round: cmi_cifar10.sh --g_steps 200 (the Fast-DFKD table's "CMI-500" runs 500).
    synthesis_iterations: int = 200
    generator_lr: float = 1e-3                     # cmi_cifar10.sh --lr_g 1e-3 (generator and z alike)
    generator_beta1: float = 0.5                   # contrastive.py Adam betas [0.5, 0.999]
    generator_beta2: float = 0.999
    generator_lr_follows_schedule: bool = False    # no schedule on the inversion Adam (commented out there)
    # Re-initialise the generator every round (reset_model; Fast-Datafree's feature_reuse=False default).
    reset_generator: bool = True
    bn_weight: float = 1.0                         # --bn 1.0
    one_hot_weight: float = 1.0                    # --oh 1.0 (0.5 in the adversarial-CMI script)
    adversarial_weight: float = 0.5                # --adv 0.5
    contrastive_weight: float = 0.8                # --cr 0.8
    contrastive_temperature: float = 0.2           # --cr_T 0.2 (0.1 in the "scratch" script)
    head_dim: int = 256                            # datafree_kd.py head_dim=256
    head_lr: Optional[float] = None                # None: generator_lr (optimizer_head = Adam(head, lr_g))
    memory_bank_size: int = 40960                  # datafree_kd.py bank_size=40960
    negatives: int = 4096                          # datafree_kd.py n_neg=4096
    first_bn_weight: float = 1.0                   # all BN layers alike (zju-vipa DeepInversionHook)
    # The teacher's input normalisation applied to the generator's [0, 1] pixels (zju-vipa `normalizer`) is
    # the run's: recipe image_mean / image_std (SynthesisContext); zju-vipa CIFAR-10 (registry.py):
    # [0.4914, 0.4822, 0.4465] / [0.2023, 0.1994, 0.2010].
    augment_padding: int = 4                       # global view RandomCrop(32, padding=4)
    local_crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # local view scale [0.25, 1]
    # The pool of [0, 1] images (the reference's PNG ImagePool, unbounded): FIFO, 51200 = 200 rounds x 256.
    pool_capacity: int = 51200
    # Where the pool lives: replay_storage / replay_dir (ReplayStorageConfig). uint8 by default: the PNG pool's
    # 8-bit quantisation of [0, 1] pixels.
    replay_dtype: Literal["uint8", "float16", "float32"] = "uint8"
    # KD-time augmentation of pool samples: the data set's training transform, RandomCrop(pad 4) + flip.
    kd_augment: bool = True
    kd_augment_padding: int = 4
    # contrastive.py puts the student in eval() during synthesis.
    student_mode_in_synthesis: Literal["train", "eval"] = "eval"
    distributed_bn_statistics: bool = False        # DESIGN.md fact 6

    def term_weights(self) -> dict[str, float]:
        return {"bn_stats": self.bn_weight, "one_hot": self.one_hot_weight, "adversarial": self.adversarial_weight,
                "contrastive": self.contrastive_weight}

    def validate(self) -> None:
        for name in ("student_steps_per_round", "per_device_synthesis_batch_size", "synthesis_iterations", "nz",
                     "ngf", "head_dim", "memory_bank_size", "pool_capacity"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("temperature", "generator_lr", "contrastive_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(f"head_lr must be positive (or None for generator_lr), got {self.head_lr}")
        if self.negatives < 0:
            raise ConfigError(f"negatives must be >= 0 (0: no cached negatives), got {self.negatives}")
        weights = dict(bn_weight=self.bn_weight, one_hot_weight=self.one_hot_weight,
                       adversarial_weight=self.adversarial_weight, contrastive_weight=self.contrastive_weight)
        for name, value in weights.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 switches the term off), got {value}")
        if not any(weights.values()):
            raise ConfigError(f"CMI needs at least one positive loss weight ({', '.join(weights)})")
        self.validate_replay_storage()
        low, high = (list(self.local_crop_scale) + [None, None])[:2]
        if len(self.local_crop_scale) != 2 or not 0 < low <= high <= 1:
            raise ConfigError("local_crop_scale must be [low, high] with 0 < low <= high <= 1, "
                              f"got {self.local_crop_scale}")
        if self.augment_padding < 0 or self.kd_augment_padding < 0:
            raise ConfigError("augment_padding and kd_augment_padding must be >= 0")


# --- the read side ------------------------------------------------------------------------------------
class NormalizedReplaySource(ReplaySource):
    """Uniform pool samples of [0, 1] pixels, then (optionally) random crop with zero padding +
    horizontal flip per sample, then the teacher's normalisation: the reference's training transform
    (RandomCrop(pad 4) + flip + ToTensor + Normalize) on tensors. All draws come from the source's
    own generator, so its state_dict covers them."""

    def __init__(self, buffer: ReplayBuffer, batch_size: int, rng: torch.Generator, padding: Optional[int],
                 mean: Tensor, std: Tensor) -> None:
        super().__init__(buffer, batch_size, rng)
        self.padding, self.mean, self.std = padding, mean, std

    @torch.no_grad()
    def next_batch(self) -> SyntheticBatch:
        batch = super().next_batch()
        images = batch.images
        if self.padding is not None:
            images = random_horizontal_flip(random_crop_with_padding(images, self.padding, self.rng), self.rng)
        batch.images = (images - self.mean.to(images.device)) / self.std.to(images.device)
        return batch


# --- the method ---------------------------------------------------------------------------------------
class CMI(Synthesizer):
    name = "cmi"
    config_class = CMIConfig
    paper = ("Fang et al., Contrastive Model Inversion for Data-Free Knowledge Distillation, IJCAI 2021 "
             "(arXiv:2105.08584)")
    config: CMIConfig
    needs_batchnorm_teacher = True

    def __init__(self, config: CMIConfig, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(config, teacher, **kwargs)
        config.validate()
        self.check_image_shape(config, self.image_shape)
        if not has_batchnorm(teacher):
            raise ConfigError(
                f"CMI matches the teacher's BatchNorm statistics and contrasts its BatchNorm inputs; "
                f"{type(teacher).__name__} has no BatchNorm2d layer (LeNet-5 has none): use a teacher with "
                "BatchNorm, or a method without BN terms (e.g. dfad)")
        device = self.context.device
        channels = self.image_shape[0]
        # the reference's `normalizer`: the teacher's input normalisation, from the run (SynthesisContext)
        self.mean, self.std = self.context.normalization(channels,
                                                         required_by=f"CMI's generator {config.generator!r}")
        self.generator = build_generator(config.generator, nz=config.nz, image_size=self.image_shape[1],
                                         channels=channels, ngf=config.ngf).to(device).train()
        self.rng = self.context.make_rng(stream=0)  # generator resets, latents, targets, views, negatives
        self.feature_layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad(), training_mode(teacher, False), instance_features(self.feature_layers) as features:
            teacher(torch.zeros((1, *self.image_shape), device=device))
            self.feature_dim = features().shape[1]
        self.head = ProjectionHead(self.feature_dim, config.head_dim).to(device).train()
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=config.head_lr or config.generator_lr)
        self.memory_bank = FeatureMemoryBank(config.memory_bank_size, 2 * self.feature_dim, device)
        self.pool = config.build_pool(config.pool_capacity, self.context, value_range=(0.0, 1.0))
        self.last_latents: Optional[Tensor] = None   # the last round's z, for inspection and tests

    @classmethod
    def check_image_shape(cls, config: CMIConfig, image_shape: tuple[int, int, int]) -> None:
        # CMI augments [0, 1] pixels, then normalises them for the teacher: only pixel generators.
        build_checked_generator(config.generator, nz=config.nz, ngf=config.ngf, image_shape=image_shape,
                                output_spaces=("pixel",), method="CMI", use="sigmoid_generator")

    # ---------------------------------------------------------------------------------------------
    def normalize(self, pixels: Tensor) -> Tensor:
        return (pixels - self.mean) / self.std

    def views(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The global (crop with padding + flip) and local (random resized crop + flip) views, normalised."""
        cfg = self.config
        global_view = random_horizontal_flip(random_crop_with_padding(pixels, cfg.augment_padding, self.rng), self.rng)
        local_view = random_horizontal_flip(
            random_resized_crop(pixels, self.rng, scale=tuple(cfg.local_crop_scale)), self.rng)
        return self.normalize(global_view), self.normalize(local_view)

    def loss_terms(self, global_view: Tensor, local_view: Tensor, targets: Tensor,
                   student: nn.Module) -> tuple[dict[str, Tensor], Tensor]:
        """The unweighted terms of one iteration and the detached [local, global] features of the batch
        (what the memory bank stores). Terms whose weight is 0 are left out (the student is not run
        without the adversarial term); the features are always computed (the bank needs them)."""
        cfg, terms = self.config, {}
        with self.context.autocast():
            with instance_features(self.feature_layers) as features:
                if cfg.bn_weight > 0:
                    with BatchNormStatistics(self.teacher, first_layer_weight=cfg.first_bn_weight,
                                             distributed=cfg.distributed_bn_statistics) as bn:
                        teacher_logits = logits_of(self.teacher(global_view))
                        terms["bn_stats"] = bn.loss()
                else:
                    teacher_logits = logits_of(self.teacher(global_view))
                global_features = features()
                student_logits = logits_of(student(global_view)) if cfg.adversarial_weight > 0 else None
                self.teacher(local_view)
                local_features = features()
        if cfg.one_hot_weight > 0:
            terms["one_hot"] = F.cross_entropy(teacher_logits.float(), targets)
        if student_logits is not None:
            terms["adversarial"] = losses.decision_adversarial(student_logits, teacher_logits)
        if cfg.contrastive_weight > 0:
            cached = self.memory_bank.sample(cfg.negatives, self.rng)
            cached_local, cached_global = cached[:, : self.feature_dim], cached[:, self.feature_dim:]
            projected = self.head(torch.cat([local_features, cached_local, global_features, cached_global]))
            proj_local, proj_global = projected.chunk(2, dim=0)
            terms["contrastive"] = instance_discrimination(proj_local, proj_global, local_features.shape[0],
                                                           cfg.contrastive_temperature)
        return terms, torch.cat([local_features, global_features], dim=1).detach()

    def _scope(self, student: nn.Module) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(frozen(student))
        stack.enter_context(training_mode(student, self.config.student_mode_in_synthesis == "train"))
        stack.enter_context(training_mode(self.teacher, False))
        stack.enter_context(training_mode(self.generator, True))
        return stack

    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        cfg = self.config
        lr = cfg.generator_lr * (lr_scale if cfg.generator_lr_follows_schedule else 1.0)
        b, device = cfg.per_device_synthesis_batch_size, self.context.device
        if cfg.reset_generator:
            reset_generator_(self.generator, self.rng)
        z = torch.randn(b, cfg.nz, generator=self.rng, device=self.rng.device).to(device).requires_grad_()
        targets = torch.randint(0, self.num_classes, (b,), generator=self.rng, device=self.rng.device).to(device)
        targets = targets.sort().values  # contrastive.py sorts them "for better visualization"
        optimizer = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}], lr=lr,
                                     betas=(cfg.generator_beta1, cfg.generator_beta2))
        weights = cfg.term_weights()
        best_loss = torch.full((), float("inf"), device=device)
        best_pixels = best_features = None
        with self._scope(student):
            # iterations + 1 evaluations: the last one scores the final iterate (no step after it).
            for it in range(cfg.synthesis_iterations + 1):
                pixels = self.generator(z)
                terms, features = self.loss_terms(*self.views(pixels), targets, student)
                loss = sum(weights[name] * term for name, term in terms.items())
                detached = loss.detach().float()
                if best_pixels is None:
                    best_pixels, best_features, best_loss = pixels.detach(), features, detached
                else:
                    better = detached < best_loss  # on device: no host sync per iteration
                    best_pixels = torch.where(better, pixels.detach(), best_pixels)
                    best_features = torch.where(better, features, best_features)
                    best_loss = torch.where(better, detached, best_loss)
                if it == cfg.synthesis_iterations:
                    break
                self._inversion_step(loss, optimizer, lr)
        self.last_latents = z.detach()
        self.pool.add(best_pixels)
        self.memory_bank.add(best_features)
        self.rounds += 1
        out = {k: v.detach() for k, v in terms.items()}
        out["total"] = detached           # the final iterate's loss
        out["best_total"] = best_loss     # the loss of the images added to the pool
        return SynthesisOutput(losses=out, images=self.normalize(best_pixels), targets=targets)

    def _inversion_step(self, loss: Tensor, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """One Adam step of this rank's generator + latents, and one of the projection head. No gradient
        all-reduce: each rank inverts its own batch with its own freshly initialised generator."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.step(self.head_optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()
            self.head_optimizer.step()

    # ---------------------------------------------------------------------------------------------
    def build_source(self, batch_size: int) -> NormalizedReplaySource:
        padding = self.config.kd_augment_padding if self.config.kd_augment else None
        return NormalizedReplaySource(self.pool, batch_size, self.context.make_rng(stream=1), padding,
                                      self.mean, self.std)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "head": self.head}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"head": self.head_optimizer}   # the generator + z Adam is created fresh every round

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "pool": self.pool.state_dict(),
                "memory_bank": self.memory_bank.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.pool.load_state_dict(state["pool"])
        self.memory_bank.load_state_dict(state["memory_bank"])


__all__ = ["CMI", "CMIConfig", "FeatureMemoryBank", "NormalizedReplaySource", "ProjectionHead",
           "instance_discrimination", "reset_generator_"]
