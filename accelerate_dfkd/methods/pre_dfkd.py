"""PRE-DFKD: Pseudo Replay Enhanced Data-Free Knowledge Distillation (Binici, Aggarwal, Pham, Leman,
Mitra; "Robust and Resource-Efficient Data-Free Knowledge Distillation by Generative Pseudo Replay",
AAAI 2022; code kuluhan/PRE-DFKD).

Two generators. The *novel* generator (DAFL's generator with spectral norm) makes samples on which
the teacher is confident and class-balanced (DAFL's losses) and on which the student disagrees with
the teacher (1 - JS). The *memory* generator is the decoder of a VAE trained on novel samples and on
its own replayed samples, so it models the distribution of everything generated so far; the student
learns on novel samples concatenated with "memory" samples decoded from latents tuned for class
balance. Replay therefore costs the VAE's weights, a constant, instead of a growing image bank.

Symbol map (paper -> here):
    theta_n, the novel generator           -> self.novel_generator (models/vae.py PreDFKDGenerator,
                                              spectral_norm=True)
    G_m, E_m (memory generator, encoder)   -> self.vae.decoder (= self.memory_generator), self.vae.encoder
    Eq. 2: lambda_1 t log y (one-hot CE)   -> one_hot_weight * CE(teacher logits, teacher argmax)
           -lambda_2 ||f_T||_1             -> activation_weight * (-mean |penultimate teacher feature|)
           -lambda_3 H(p(y_T))             -> entropy_weight * sum p_bar log10 p_bar (log10 as the code)
    Eq. 1/3: alpha (1 - JS(y_T || y_S))    -> adversarial_weight * js_disagreement(...) (T = 3, clamped)
    Algorithm 1, L_VAE = L_rec + gamma KLD -> _vae_step: L1(x_hat, x) + vae_teacher_weight *
                                              L1(T(x_hat), T(x)) + vae_kl_weight * KLD (Eq. 5-7)
    Algorithm 2, L_z = -H + R              -> _tune_latents: entropy + one-hot + moment matching of z,
                                              memory_latent_steps Adam steps at memory_latent_lr
    Eq. 9, ||S(x_n, x_m) - T(x_n, x_m)||_1 -> student_losses: L1 on logits of the concatenated batch

Defaults are the reference code's (kuluhan/PRE-DFKD `main.py`, `distillation.py`,
`networks/generator.py`, `utils/aux.py`; implementations.md section 2.9), each cited at its field.

What the reference does per iteration (36 per epoch): 1 novel-generator step; then 10 KD steps,
each on a fresh novel batch of bs = 1024 plus bs/8 = 128 memory samples (fresh z ~ N(0, I), one
step of a fresh Adam at lr 0.02 on Algorithm 2's loss, decoded with the memory generator in eval
mode); after each of the first 4 KD steps one VAE step on the first half of that KD step's novel
batch plus 128 freshly tuned memory samples (novel samples only in the very first iteration).

Deviations, all forced by the library's shape (write side in `synthesize()`, read side a source
that never trains anything) or chosen for safety; none changes a loss or a default weight:
1. Order inside a round. `synthesize()` runs the novel-generator step, then the 4 VAE steps, then
   tunes the latents of the whole round's memory batches (Algorithm 2), one batch per student step
   (`student_steps_per_round` of them). The reference interleaves the 4 VAE steps with the first 4
   KD steps, so its KD steps 0-3 replay from a VAE 0-3 updates older than here.
2. Where the latents are tuned. The reference tunes each memory batch right before the KD step that
   uses it; here all of a round's batches are tuned inside `synthesize()` (same count, same loss,
   same single fresh-Adam step per batch, same eval-mode decoder) and kept as latents
   (`MemoryLatents`, k x n_mem x nz floats, constant size, replaced every round); `VAEReplaySource`
   only decodes them. The decoder does not change between synthesis and reading, and in eval mode
   decoding is per-sample, so the images equal the reference's up to the order in 1. With gradient
   accumulation the source reads more batches than were tuned and cycles through them.
3. The VAE's novel half-batch. The reference trains the VAE on the first half of the batch the
   student just learned from; the source's batches are not visible to `synthesize()`, so each VAE
   step draws its own bs/2 novel samples (same generator, train mode, same distribution).
4. Student batch size. `build_source(B)` yields B samples in all: B - n_mem novel + n_mem memory with
   n_mem = round(B r / (1 + r)), r = replay_ratio = 1/8 (B = 1152 gives the reference's 1024 + 128).
5. NaN guards: sum p log10 p gets an epsilon (the reference has none, implementations.md s.9.9);
   the latent variance uses the biased estimate for a 1-sample batch (unbiased is NaN there).
6. The student optimizer is the Distiller's SGD (the reference uses SGD lr 0.1, momentum 0.9, wd
   5e-4, cosine over 400 epochs for CIFAR, and Adam for MNIST).

Kept reference quirks (each switchable): BatchNorm eps 0.8 (`bn_eps`), the encoder's L2
normalisation along the image height (`encoder_normalize_columns`), the adversarial "JS" exactly as
`utils/aux.py` computes it (KL(M || P) directions, element-mean, clamps; see `js_disagreement`), the
teacher's logits (not features) in the reconstruction loss (`vae_teacher_target`), and the memory
generator also receiving the gradient of Algorithm 2's one-hot/entropy loss in its VAE step (the
reference zeroes the decoder's gradients *before* tuning the latents, then backpropagates both;
`vae_match_loss_on_decoder`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses
from ..config import ConfigError, MethodConfig
from ..hooks import FeatureCapture, frozen, last_linear, training_mode
from ..models.vae import VAE, PreDFKDGenerator, pre_dfkd_vae, vae_kl_divergence
from ..synthesis import GeneratorSource, MixedSource, SynthesisOutput, Synthesizer, SyntheticBatch, SyntheticSource
from ..utils import logits_of

_LN10 = math.log(10.0)


# --- loss terms (pure functions) --------------------------------------------------------------------
def neg_entropy_log10(logits: Tensor) -> Tensor:
    """sum_c p_bar_c log10 p_bar_c of the batch-mean softmax (<= 0; minimising it balances classes).

    The reference (`distillation.py`) uses log10 without an epsilon, NaN once a class probability of
    the batch mean underflows to 0; losses.batch_entropy adds the epsilon (natural log, / ln 10 here).
    """
    return -losses.batch_entropy(logits) / _LN10


def js_disagreement(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0,
                    clamp_min: float = 0.01, clamp_max: float = 0.99) -> Tensor:
    """PRE-DFKD's adversarial term, 1 - JS, exactly as `utils/aux.py` `JS_divergence` computes it.

    P = softmax(teacher / T), Q = softmax(student / T), M = (P + Q) / 2, each clamped to
    [clamp_min, clamp_max]; JS = 0.5 KLDivLoss(log P, M) + 0.5 KLDivLoss(log Q, M), where PyTorch's
    KLDivLoss(input, target) is mean(target * (log target - input)) over all elements (batch x
    classes), i.e. KL(M || P) and KL(M || Q) divided by the number of classes; the loss is
    1 - clamp(JS, 0, 1). Minimising it maximises the teacher-student disagreement. The clamps keep
    every logarithm finite for arbitrarily confident teachers (their gradient is 0 where a
    probability is clamped). Pass the teacher's logits detached, as the reference does.
    """
    p = F.softmax(teacher_logits.float() / temperature, dim=1)
    q = F.softmax(student_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(clamp_min, clamp_max)  # the mixture of the unclamped distributions
    p, q = p.clamp(clamp_min, clamp_max), q.clamp(clamp_min, clamp_max)
    js = 0.5 * (m * (m.log() - p.log())).mean() + 0.5 * (m * (m.log() - q.log())).mean()
    return 1.0 - js.clamp(0.0, 1.0)


def latent_moment_loss(z: Tensor) -> Tensor:
    """Algorithm 2's KL stand-in from the code: MSE(var_batch(z), 1) + MSE(mean_batch(z), 0), per
    latent coordinate. Unbiased variance as `torch.var`, biased for a single sample (no NaN)."""
    z = z.float()
    var = z.var(dim=0, unbiased=z.shape[0] > 1)
    return F.mse_loss(var, torch.ones_like(var)) + F.mse_loss(z.mean(dim=0), torch.zeros_like(var))


# --- config ---------------------------------------------------------------------------------------
@dataclass
class PreDFKDConfig(MethodConfig):
    # Student loss: L1 on logits (distillation.py `F.l1_loss(outputs_S, outputs_T)`; paper Eq. 9).
    student_loss: Literal["kl", "l1"] = "l1"
    # 10 student steps per novel-generator step (main.py --kd_iter 10, --gen_iter 1).
    student_steps_per_round: int = 10
    generator_steps: int = 1
    # Latent size of the novel generator, the memory generator and the encoder (main.py
    # --latent_dim 1000). Small images need far less (the digits recipe uses 100).
    nz: int = 1000
    ngf: int = 64                     # generator widths 2ngf/ngf = 128/64 (networks/generator.py)
    nef: int = 64                     # encoder widths nef/2nef/2nef = 64/128/128 (networks/generator.py)
    per_device_synthesis_batch_size: int = 1024  # main.py --batch_size 1024 (novel batches)
    generator_lr: float = 0.02        # main.py --lr_G 0.02; Adam with PyTorch's default betas
    generator_beta1: float = 0.9
    generator_beta2: float = 0.999
    # main.py builds a scheduler for the student only: generator and VAE LRs stay constant.
    generator_lr_follows_schedule: bool = False
    novel_generator_spectral_norm: bool = True   # spectral_norm on the novel generator's 3 convs
    # `nn.BatchNorm2d(c, 0.8)` in networks/generator.py: eps 0.8, a PyTorch-GAN idiom where Keras'
    # momentum 0.8 was intended. Kept for fidelity; 1e-5 is PyTorch's default.
    bn_eps: float = 0.8
    weight_init_range: float = 0.08   # conv/linear weights U(-0.08, 0.08), zero biases; 0: PyTorch init
    # Novel-generator loss (main.py --oh 1 --ie 5 --a 0.1; the 1 - JS term is added unweighted).
    one_hot_weight: float = 1.0
    entropy_weight: float = 5.0       # on sum p log10 p (5 in log10 is 2.17 in nats)
    activation_weight: float = 0.1
    adversarial_weight: float = 1.0
    # "js": PRE-DFKD's 1 - JS(T, S) (Eq. 1); "l1": DFAD's -L1(T, S) (DFAD Eq. 6), for the paper's
    # PRE-DFAD ablation (methods/pre_dfad.py), where DFAD makes the novel samples.
    adversarial_loss: Literal["js", "l1"] = "js"
    adversarial_temperature: float = 3.0  # utils/aux.py JS_divergence: T = 3.0
    adversarial_clamp_min: float = 0.01   # torch.clamp(P, 0.01, 0.99)
    adversarial_clamp_max: float = 0.99
    # The reference's student is in train() during the novel-generator step (main.py sets
    # student.train() each epoch; distill_knowledge restores train() after replay).
    student_mode_in_synthesis: Literal["train", "eval"] = "train"
    # The novel generator is never put in eval() by the reference: KD batches come in train mode.
    sample_generator_in_train_mode: bool = True
    # --- the VAE (memory generator = decoder, trained with the encoder) -----------------------
    vae_lr: float = 5e-4              # main.py: Adam(lr=opt.lr_G / 40) for both G2 and E
    vae_steps_per_round: int = 4      # main.py: `dist_step < 4` of the 10 KD steps
    vae_kl_weight: float = 1e-5       # distillation.py: kld_loss = 1e-5 * mean(...)
    # L1 between the teacher's responses to x and to its reconstruction (paper Eq. 4, 6). The code
    # uses the logits T(x) (the feature lines are commented out); "penultimate" uses the input of the
    # teacher's last Linear, the paper's "last layers" reading.
    vae_teacher_target: Literal["logits", "penultimate"] = "logits"
    vae_teacher_weight: float = 1.0   # the code sums pixel and teacher L1 unweighted; 0 = vanilla VAE
    # The reference's decoder also gets Algorithm 2's one-hot/entropy gradient in its VAE step.
    vae_match_loss_on_decoder: bool = True
    encoder_normalize_columns: bool = True  # Encoder.forward: F.normalize(img, p=2, dim=2)
    # --- replay ---------------------------------------------------------------------------------
    # Memory samples per novel sample: main.py `num_mem_samples = batch_size // 8`. 0: no replay.
    replay_ratio: float = 0.125
    # Algorithm 2: Adam steps on the memory latents (distillation.py: `for z_epoch in range(1)`, a
    # fresh Adam(lr=opt.lr_G) per batch). A fresh Adam's first step moves every coordinate by about
    # +-lr, a signed-gradient step. 0 replays plain z ~ N(0, I) (the paper's ablation, Fig. 5).
    memory_latent_steps: int = 1
    memory_latent_lr: float = 0.02
    memory_latent_moment_weight: float = 1.0  # `(loss_match + loss_kld).backward()`: unweighted
    # Algorithm 2's class-balance loss on memory samples: the novel generator's oh / ie weights in
    # the reference (distillation.py reuses opt.oh, opt.ie); separate so PRE-DFAD, whose novel
    # generator has no DAFL terms, still replays class-balanced memory samples.
    memory_one_hot_weight: float = 1.0
    memory_entropy_weight: float = 5.0

    def validate(self) -> None:
        for name in ("student_steps_per_round", "generator_steps", "nz", "ngf", "nef",
                     "per_device_synthesis_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("vae_steps_per_round", "memory_latent_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 switches it off), got {getattr(self, name)}")
        for name in ("generator_lr", "vae_lr", "adversarial_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("one_hot_weight", "entropy_weight", "activation_weight", "adversarial_weight", "vae_kl_weight",
                     "vae_teacher_weight", "replay_ratio", "memory_latent_lr", "memory_latent_moment_weight",
                     "memory_one_hot_weight", "memory_entropy_weight", "weight_init_range"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.adversarial_clamp_min < self.adversarial_clamp_max <= 1:
            raise ConfigError("need 0 <= adversarial_clamp_min < adversarial_clamp_max <= 1, got "
                              f"{self.adversarial_clamp_min}, {self.adversarial_clamp_max}")
        if self.adversarial_loss not in ("js", "l1"):
            raise ConfigError(f"adversarial_loss must be 'js' (PRE-DFKD) or 'l1' (DFAD), got {self.adversarial_loss!r}")
        if self.bn_eps <= 0:
            raise ConfigError(f"bn_eps must be positive, got {self.bn_eps}")
        if not any((self.one_hot_weight, self.entropy_weight, self.activation_weight, self.adversarial_weight)):
            raise ConfigError("PRE-DFKD needs at least one positive novel-generator weight (one_hot_weight, "
                              "entropy_weight, activation_weight, adversarial_weight)")


# --- the read side of the replay ------------------------------------------------------------------
class MemoryLatents:
    """Latents tuned inside `synthesize()` for the next round's memory batches (Algorithm 2).

    A flat (rows, nz) tensor replaced once per round; `version` counts replacements so a reading
    source knows to start from the first row again. Per rank, constant size."""

    def __init__(self) -> None:
        self.value: Optional[Tensor] = None
        self.version = 0

    def update(self, latents: Optional[Tensor]) -> None:
        self.value = None if latents is None else latents.detach()
        self.version += 1

    def nbytes(self) -> int:
        return 0 if self.value is None else self.value.numel() * self.value.element_size()

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.version = state["value"], state["version"]


class VAEReplaySource(SyntheticSource):
    """Memory samples decoded by a VAE's decoder (generative pseudo replay), without gradients.

    With `latents` (a `MemoryLatents` filled by a synthesizer), each batch decodes the next
    `batch_size` prepared latents, cycling when they run out and restarting when they are replaced.
    Without (or before any are prepared), it decodes fresh z ~ N(0, I) from `rng`: plain generative
    replay, e.g. DFAD + a memory generator (the paper's PRE-DFAD ablation) mixed in with MixedSource.
    The decoder runs in eval() by default, as the reference decodes replay for the student
    (`distill_knowledge`: `mem_generator.eval()`). Reading never trains anything.
    """

    def __init__(self, decoder: nn.Module, nz: int, batch_size: int, rng: torch.Generator,
                 latents: Optional[MemoryLatents] = None, decoder_train_mode: bool = False) -> None:
        self.decoder, self.nz, self.batch_size, self.rng = decoder, nz, batch_size, rng
        self.latents, self.decoder_train_mode = latents, decoder_train_mode
        self.version, self.position = -1, 0

    def _next_latents(self) -> Tensor:
        pool = None if self.latents is None else self.latents.value
        if pool is None or len(pool) == 0:
            return torch.randn(self.batch_size, self.nz, generator=self.rng, device=self.rng.device)
        if self.latents.version != self.version:
            self.version, self.position = self.latents.version, 0
        idx = (self.position + torch.arange(self.batch_size, device=pool.device)) % len(pool)
        self.position = (self.position + self.batch_size) % len(pool)
        return pool[idx]

    @torch.no_grad()
    def next_batch(self) -> SyntheticBatch:
        z = self._next_latents()
        with training_mode(self.decoder, self.decoder_train_mode):
            images = self.decoder(z)
        return SyntheticBatch(images=images)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "version": self.version, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.version, self.position = state["version"], state["position"]


def replay_count(batch_size: int, replay_ratio: float) -> int:
    """Memory samples in a student batch of `batch_size` in all: round(B r / (1 + r)), at least 1
    when replay is on and B >= 2, leaving at least one novel sample."""
    if replay_ratio <= 0 or batch_size < 2:
        return 0
    return min(batch_size - 1, max(1, round(batch_size * replay_ratio / (1 + replay_ratio))))


# --- the method -----------------------------------------------------------------------------------
class PreDFKD(Synthesizer):
    name = "pre_dfkd"
    config_class = PreDFKDConfig
    paper = ("Binici et al., Robust and Resource-Efficient Data-Free Knowledge Distillation by Generative "
             "Pseudo Replay, AAAI 2022")
    config: PreDFKDConfig

    def __init__(self, config: PreDFKDConfig, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(config, teacher, **kwargs)
        config.validate()
        self.check_image_shape(config, self.image_shape)
        if config.activation_weight > 0 or config.vae_teacher_target == "penultimate":
            try:
                last_linear(teacher)
            except ValueError as err:
                raise ConfigError(f"PRE-DFKD reads the teacher's penultimate features (the input of its last "
                                  f"nn.Linear) for activation_weight > 0 or vae_teacher_target=penultimate: "
                                  f"{err}") from None
        channels, size, _ = self.image_shape
        device = self.context.device
        self.novel_generator = PreDFKDGenerator(
            nz=config.nz, image_size=size, channels=channels, ngf=config.ngf, bn_eps=config.bn_eps,
            spectral_norm=config.novel_generator_spectral_norm, init_range=config.weight_init_range).to(device)
        self.vae: VAE = pre_dfkd_vae(nz=config.nz, image_size=size, channels=channels, ngf=config.ngf,
                                     nef=config.nef, bn_eps=config.bn_eps, init_range=config.weight_init_range,
                                     normalize_columns=config.encoder_normalize_columns).to(device)
        self.memory_generator = self.vae.decoder
        self.generator_optimizer = torch.optim.Adam(self.novel_generator.parameters(), lr=config.generator_lr,
                                                    betas=(config.generator_beta1, config.generator_beta2))
        # One Adam over encoder and decoder: the reference's two Adams with the same settings are
        # the same per-parameter update.
        self.vae_optimizer = torch.optim.Adam(self.vae.parameters(), lr=config.vae_lr)  # default betas
        self.rng = self.context.make_rng(stream=0)         # novel-generator latents
        self.vae_rng = self.context.make_rng(stream=2)     # VAE steps: novel half, memory z, reparameterisation
        self.replay_rng = self.context.make_rng(stream=3)  # the student's memory latents (before tuning)
        self.memory_latents = MemoryLatents()
        # Memory samples per student batch; set by build_source (the reference's bs/8 until then).
        self.replay_batch_size = max(1, int(config.per_device_synthesis_batch_size * config.replay_ratio)) \
            if config.replay_ratio > 0 else 0

    @classmethod
    def check_image_shape(cls, config: PreDFKDConfig, image_shape: tuple[int, ...]) -> None:
        channels, height, width = image_shape
        if height != width or height < 8 or height % 8:
            raise ConfigError(f"PRE-DFKD's generators and VAE encoder make square images with a side divisible by 8 "
                              f"(8, 16, 32, ...); got image shape {tuple(image_shape)}")

    def modules(self) -> dict[str, nn.Module]:
        return {"novel_generator": self.novel_generator, "vae": self.vae}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"novel_generator": self.generator_optimizer, "vae": self.vae_optimizer}

    def replay_state_bytes(self) -> int:
        """What replay keeps across rounds: the VAE's parameters and buffers (constant). The tuned
        latents of the current round (`memory_latents.nbytes()`) are working memory, replaced each round."""
        return self.vae.state_bytes()

    # --- the write side ---------------------------------------------------------------------------
    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        cfg = self.config
        lr_scale = lr_scale if cfg.generator_lr_follows_schedule else 1.0
        terms: dict[str, Tensor] = {}
        for _ in range(cfg.generator_steps):
            novel_terms, images = self._novel_generator_step(student, lr_scale)
        terms.update(novel_terms)
        for _ in range(cfg.vae_steps_per_round):
            terms.update(self._vae_step(lr_scale, novel_only=self.rounds == 0))
        match = self._prepare_memory_latents()
        if match is not None:
            terms["memory_match"] = match
        self.rounds += 1
        return SynthesisOutput(losses=terms, images=images)

    def _teacher_response(self, images: Tensor, kind: str) -> Tensor:
        if kind == "penultimate":
            with FeatureCapture(last_linear(self.teacher), capture="input") as features:
                self.teacher(images)
            return features.value.float()
        return logits_of(self.teacher(images)).float()

    def _novel_generator_step(self, student: nn.Module, lr_scale: float) -> tuple[dict[str, Tensor], Tensor]:
        """Eq. 1: DAFL's one-hot, activation and class-balance terms on the teacher + 1 - JS(T, S)."""
        cfg = self.config
        z = torch.randn(cfg.per_device_synthesis_batch_size, cfg.nz, generator=self.rng, device=self.rng.device)
        terms: dict[str, Tensor] = {}
        with training_mode(self.novel_generator, True), self.context.autocast():
            images = self.novel_generator(z)
            if cfg.activation_weight > 0:
                with FeatureCapture(last_linear(self.teacher), capture="input") as features:
                    teacher_logits = logits_of(self.teacher(images)).float()
                terms["activation"] = -features.value.float().abs().mean()
            else:
                teacher_logits = logits_of(self.teacher(images)).float()
            terms["one_hot"] = F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1))
            terms["entropy"] = neg_entropy_log10(teacher_logits)
            if cfg.adversarial_weight > 0:
                with frozen(student), training_mode(student, cfg.student_mode_in_synthesis == "train"):
                    student_logits = logits_of(student(images)).float()
                if cfg.adversarial_loss == "l1":  # DFAD: gradients through teacher and student
                    terms["adversarial"] = losses.dfad_generator_loss(student_logits, teacher_logits)
                else:  # the teacher's side detached, as in the reference: through the student only
                    terms["adversarial"] = js_disagreement(student_logits, teacher_logits.detach(),
                                                           cfg.adversarial_temperature, cfg.adversarial_clamp_min,
                                                           cfg.adversarial_clamp_max)
        weights = {"one_hot": cfg.one_hot_weight, "entropy": cfg.entropy_weight,
                   "activation": cfg.activation_weight, "adversarial": cfg.adversarial_weight}
        loss = sum(weights[k] * v for k, v in terms.items())
        self._step(loss, self.generator_optimizer, list(self.novel_generator.parameters()), lr_scale,
                   cfg.generator_lr)
        return {k: v.detach() for k, v in terms.items()}, images.detach()

    def _match_loss(self, teacher_logits: Tensor) -> Tensor:
        """Algorithm 2's class-balance / confidence part: ie sum p log10 p + oh CE(argmax)."""
        cfg = self.config
        return (cfg.memory_entropy_weight * neg_entropy_log10(teacher_logits)
                + cfg.memory_one_hot_weight * F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1)))

    def _tune_latents(self, z: Tensor, decoder_train: bool,
                      keep_decoder_graph: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Algorithm 2: Adam steps on z (a fresh optimizer per batch, as the reference) minimising
        the match loss of the decoded batch plus the latent moment loss. Returns the tuned latents
        and, with `keep_decoder_graph`, the first step's match loss still attached to the decoder's
        parameters (the reference's decoder receives that gradient in its VAE step)."""
        cfg = self.config
        if cfg.memory_latent_steps == 0:
            return z, None
        z = z.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=cfg.memory_latent_lr)
        attached = None
        for step in range(cfg.memory_latent_steps):
            keep = keep_decoder_graph and step == 0
            with training_mode(self.memory_generator, decoder_train), self.context.autocast(), \
                    (contextlib.nullcontext() if keep else frozen(self.memory_generator)):
                # A copy goes in, so the in-place Adam step on z leaves the kept graph valid.
                teacher_logits = logits_of(self.teacher(self.memory_generator(z.clone()))).float()
                match = self._match_loss(teacher_logits)
                loss = match + cfg.memory_latent_moment_weight * latent_moment_loss(z)
            (grad,) = torch.autograd.grad(loss, z, retain_graph=keep)
            if keep:
                attached = match
            z.grad = grad
            optimizer.step()
        return z.detach(), attached

    def _vae_step(self, lr_scale: float, novel_only: bool) -> dict[str, Tensor]:
        """Algorithm 1: reconstruct half a novel batch plus freshly replayed memory samples."""
        cfg = self.config
        rng = self.vae_rng
        with torch.no_grad(), training_mode(self.novel_generator, cfg.sample_generator_in_train_mode):
            z_novel = torch.randn(max(1, cfg.per_device_synthesis_batch_size // 2), cfg.nz, generator=rng,
                                  device=rng.device)
            parts = [self.novel_generator(z_novel)]
        attached = None
        n_memory = max(1, int(cfg.per_device_synthesis_batch_size * cfg.replay_ratio)) if cfg.replay_ratio > 0 else 0
        if not novel_only and n_memory:
            z0 = torch.randn(n_memory, cfg.nz, generator=rng, device=rng.device)
            # The reference tunes and decodes these in train() mode (train_memory_generator).
            z, attached = self._tune_latents(z0, decoder_train=True, keep_decoder_graph=cfg.vae_match_loss_on_decoder)
            with torch.no_grad(), training_mode(self.memory_generator, True):
                parts.append(self.memory_generator(z))
        images = torch.cat(parts).detach()
        noise = torch.randn(images.shape[0], cfg.nz, generator=rng, device=rng.device)
        with training_mode(self.vae, True), self.context.autocast():
            with torch.no_grad():
                target = self._teacher_response(images, cfg.vae_teacher_target)
            reconstruction, mu, logvar = self.vae(images, noise)
            terms = {"vae_pixel": F.l1_loss(reconstruction.float(), images.float())}
            if cfg.vae_teacher_weight > 0:
                response = self._teacher_response(reconstruction, cfg.vae_teacher_target)
                terms["vae_teacher"] = F.l1_loss(response, target)
            terms["vae_kl"] = vae_kl_divergence(mu, logvar)
            loss = (terms["vae_pixel"] + cfg.vae_teacher_weight * terms.get("vae_teacher", 0.0)
                    + cfg.vae_kl_weight * terms["vae_kl"])
            if attached is not None:
                loss = loss + attached
        self._step(loss, self.vae_optimizer, list(self.vae.parameters()), lr_scale, cfg.vae_lr)
        return {k: v.detach() for k, v in terms.items()}

    def _prepare_memory_latents(self) -> Optional[Tensor]:
        """Algorithm 2 for the next round: one tuned latent batch per student step, decoder in eval()
        as the reference's `distill_knowledge`. Returns the last batch's match loss (for logging)."""
        cfg, n = self.config, self.replay_batch_size
        if n == 0:
            self.memory_latents.update(None)
            return None
        batches, match = [], None
        for _ in range(cfg.student_steps_per_round):
            z0 = torch.randn(n, cfg.nz, generator=self.replay_rng, device=self.replay_rng.device)
            z, _ = self._tune_latents(z0, decoder_train=False)
            batches.append(z)
        with torch.no_grad(), training_mode(self.memory_generator, False), self.context.autocast():
            match = self._match_loss(logits_of(self.teacher(self.memory_generator(batches[-1]))).float())
        self.memory_latents.update(torch.cat(batches))
        return match.detach()

    # --- the read side ----------------------------------------------------------------------------
    def build_source(self, batch_size: int) -> SyntheticSource:
        """Each batch: batch_size - n_mem novel samples + n_mem replayed memory samples (the
        reference's 1024 + 128 for batch_size 1152). Also sets the size of the latents that the next
        `synthesize()` prepares to n_mem."""
        cfg = self.config
        n_memory = replay_count(batch_size, cfg.replay_ratio)
        self.replay_batch_size = n_memory
        novel = GeneratorSource(self.novel_generator, cfg.nz, batch_size - n_memory, self.context.make_rng(stream=1),
                                generator_train_mode=cfg.sample_generator_in_train_mode)
        if n_memory == 0:
            return MixedSource([novel])
        replay = VAEReplaySource(self.memory_generator, cfg.nz, n_memory, self.context.make_rng(stream=4),
                                 latents=self.memory_latents)
        return MixedSource([novel, replay])

    # --- state --------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "vae_rng": self.vae_rng.get_state(),
                "replay_rng": self.replay_rng.get_state(), "memory_latents": self.memory_latents.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.vae_rng.set_state(state["vae_rng"])
        self.replay_rng.set_state(state["replay_rng"])
        latents = dict(state["memory_latents"])
        if latents["value"] is not None:  # per-rank checkpoints are loaded on the CPU
            latents["value"] = latents["value"].to(self.context.device)
        self.memory_latents.load_state_dict(latents)
