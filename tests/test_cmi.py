"""CMI: conformance (the synthesis parameters are the re-initialised generator and the projection head),
its cited defaults, the contrastive term and memory bank, the generator reset, the pool of [0, 1] pixels
(in memory and on disk), the BatchNorm refusal, and a short real-data run."""

import copy

import pytest
import torch
import torch.nn.functional as F

from accelerate_dfkd.config import ConfigError, load_recipe
from accelerate_dfkd.methods import METHODS
from accelerate_dfkd.methods.cmi import (CMI, CMIConfig, FeatureMemoryBank, instance_discrimination,
                                         reset_generator_)
from accelerate_dfkd.models import build_model
from accelerate_dfkd.synthesis import DiskReplayBuffer, ReplayBuffer, SynthesisContext

from .conformance import SynthesizerConformance, _equal, _snapshot
from .conftest import REPO, short_digits_run, tiny_student, tiny_teacher

# Small but real: 8x8 one-channel images, a narrow generator and head.
SMALL = dict(per_device_synthesis_batch_size=32, synthesis_iterations=3, nz=16, ngf=8, head_dim=16,
             memory_bank_size=128, negatives=48, augment_padding=1, kd_augment_padding=1, pool_capacity=256)
# The teacher's input normalisation (the digits'), which the run hands to the method through its context.
DIGITS = dict(image_mean=[0.3056], image_std=[0.3761])


def make(teacher=None, seed=0, **overrides) -> CMI:
    cfg = CMIConfig(**{**SMALL, **overrides})
    return CMI(cfg, teacher if teacher is not None else tiny_teacher(), image_shape=(1, 8, 8), num_classes=10,
               context=SynthesisContext(seed=seed, **DIGITS))


class TestCMIConformance(SynthesizerConformance):
    loss_terms = {"bn_weight": 1.0, "one_hot_weight": 1.0, "adversarial_weight": 1.0, "contrastive_weight": 1.0}
    equal_student_overrides = {"student_mode_in_synthesis": "eval"}

    def make_synthesizer(self, teacher, seed=0, **overrides):
        return make(teacher, seed, **overrides)

    def trained_parameters(self, synth):
        # The generator (reset, then trained every round); the head only learns from the contrastive term.
        return list(synth.generator.parameters())

    def test_each_loss_term_reaches_the_generator(self):
        super().test_each_loss_term_reaches_the_generator()
        # The contrastive term, alone, also trains the head, and reaches the latents z; with a second
        # round there are cached negatives, and the term still reaches the generator.
        off = {k: 0.0 for k in self.loss_terms if k != "contrastive_weight"}
        synth = make(**off)
        head_before = copy.deepcopy(synth.head.state_dict())
        synth.synthesize(tiny_student())
        assert not _equal(head_before, synth.head.state_dict()), "the contrastive term did not train the head"
        assert len(synth.memory_bank) == 32
        synth.synthesize(tiny_student())
        assert sum(float(p.grad.abs().sum()) for p in synth.generator.parameters()) > 0
        # With the contrastive term off, the head is never touched.
        quiet = make(contrastive_weight=0.0)
        head_before = copy.deepcopy(quiet.head.state_dict())
        quiet.synthesize(tiny_student())
        assert _equal(head_before, quiet.head.state_dict())


def test_registered_and_defaults_follow_the_references():
    assert METHODS["cmi"] is CMI and CMI.needs_batchnorm_teacher
    cfg = CMIConfig()
    assert (cfg.student_loss, cfg.temperature, cfg.student_steps_per_round) == ("kl", 20.0, 400)
    assert (cfg.generator, cfg.nz, cfg.ngf, cfg.per_device_synthesis_batch_size) == ("sigmoid_generator", 256, 64, 256)
    assert (cfg.synthesis_iterations, cfg.generator_lr) == (200, 1e-3)
    assert (cfg.generator_beta1, cfg.generator_beta2) == (0.5, 0.999)
    assert (cfg.bn_weight, cfg.one_hot_weight, cfg.adversarial_weight) == (1.0, 1.0, 0.5)
    assert (cfg.contrastive_weight, cfg.contrastive_temperature, cfg.head_dim) == (0.8, 0.2, 256)
    assert (cfg.memory_bank_size, cfg.negatives, cfg.head_lr, cfg.reset_generator) == (40960, 4096, None, True)
    assert cfg.local_crop_scale == [0.25, 1.0] and cfg.augment_padding == 4 and cfg.kd_augment_padding == 4
    assert "pixel_mean" not in CMIConfig.__dataclass_fields__   # the run's image_mean / image_std instead
    assert (cfg.replay_storage, cfg.replay_dtype, cfg.student_mode_in_synthesis) == ("memory", "uint8", "eval")


def test_instance_discrimination_matches_a_hand_computed_example():
    # Two current rows, one cached row. Row i's target is column i; the current and cached means add up.
    local = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    glob = F.normalize(torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 0.9]]), dim=1)
    logits = local @ glob.T / 0.5
    per_row = -torch.log_softmax(logits, dim=1).diagonal()
    expected = per_row[:2].mean() + per_row[2:].mean()
    assert torch.allclose(instance_discrimination(local, glob, current=2, temperature=0.5), expected)
    assert torch.allclose(instance_discrimination(local[:2], glob[:2], current=2, temperature=0.5),
                          (-torch.log_softmax(local[:2] @ glob[:2].T / 0.5, dim=1).diagonal()).mean())
    # The global projections are a stop-gradient target: only the local side receives gradient.
    local.requires_grad_(), glob.requires_grad_()
    instance_discrimination(local, glob, 2, 0.5).backward()
    assert local.grad.abs().sum() > 0 and glob.grad is None


def test_memory_bank_is_a_ring_with_distinct_negatives_and_a_state():
    bank = FeatureMemoryBank(capacity=5, dim=2, device=torch.device("cpu"))
    rng = torch.Generator().manual_seed(0)
    assert bank.sample(3, rng).shape == (0, 2)
    bank.add(torch.arange(8.0).view(4, 2))
    bank.add(torch.arange(8.0, 14.0).view(3, 2))      # wraps: rows 0 and 1 are replaced
    assert len(bank) == 5 and bank.updates == 7
    assert sorted(bank.features[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]
    drawn = bank.sample(4, rng)
    assert drawn.shape == (4, 2) and len(set(drawn[:, 0].tolist())) == 4
    assert bank.sample(50, rng).shape == (5, 2)          # at most what is filled
    clone = FeatureMemoryBank(capacity=5, dim=2, device=torch.device("cpu"))
    clone.load_state_dict(copy.deepcopy(bank.state_dict()))
    assert torch.equal(clone.features, bank.features) and (clone.updates, clone._next) == (7, bank._next)


def test_generator_is_reset_every_round_from_the_rank_stream():
    generator = build_model("digits_cnn", 10, in_channels=1).requires_grad_(False)  # any conv/BN/linear net
    reset_generator_(generator, torch.Generator().manual_seed(0))
    bns = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in generator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(abs(float(m.weight.mean()) - 1.0) < 0.02 and float(m.bias.abs().sum()) == 0 for m in bns)
    assert all(float(m.weight.std()) < 0.03 for m in convs)

    def weights_seen_by_each_forward(reset: bool) -> list[torch.Tensor]:
        synth = make(reset_generator=reset, generator_lr=0.5)  # a large step, so training is visible
        seen = []
        handle = synth.generator.project.register_forward_pre_hook(
            lambda module, args: seen.append(module.weight.detach().clone()))
        synth.synthesize(tiny_student()), synth.synthesize(tiny_student())
        handle.remove()
        return seen  # 4 forwards per round: 3 iterations + the final iterate's evaluation

    with_reset, without = weights_seen_by_each_forward(True), weights_seen_by_each_forward(False)
    assert float(with_reset[3].std()) > 0.1, "round 1 did not train the generator"
    assert float(with_reset[4].std()) < 0.03 and not torch.equal(with_reset[4], with_reset[0])  # fresh draw
    assert torch.equal(without[4], without[3])   # without reset, round 2 continues from round 1


def test_pool_holds_the_best_pixels_and_sources_normalise_them():
    synth = make(kd_augment=False, replay_dtype="float32")
    student = tiny_student()
    out = synth.synthesize(student)
    assert set(out.losses) == {"bn_stats", "one_hot", "adversarial", "contrastive", "total", "best_total"}
    assert out.losses["best_total"] <= out.losses["total"]
    pixels = synth.pool.images[:32]
    assert pixels.min() >= 0 and pixels.max() <= 1          # the generator's sigmoid pixels, stored as they are
    assert torch.allclose(out.images, (pixels - 0.3056) / 0.3761)
    batch = synth.build_source(16).next_batch()
    assert torch.allclose(batch.images, (pixels[batch.indices] - 0.3056) / 0.3761)
    assert len(synth.memory_bank) == 32 and synth.memory_bank.features.shape[1] == 2 * synth.feature_dim
    # Default uint8 pool: the reference's 8-bit PNG quantisation of the same pixels.
    quantised = make(kd_augment=False)
    quantised.synthesize(tiny_student())
    assert quantised.pool.images.dtype == torch.uint8
    assert torch.allclose(quantised.build_source(8).next_batch().images * 0.3761 + 0.3056,
                          (quantised.pool.images[:32].float() / 255)[quantised.build_source(8).next_batch().indices])


def test_disk_pool_round_trips_and_matches_the_memory_pool(tmp_path):
    memory = make(seed=1, replay_dtype="float16")
    disk = make(seed=1, replay_dtype="float16", replay_storage="disk", replay_dir=str(tmp_path / "replay"))
    assert isinstance(disk.pool, DiskReplayBuffer) and isinstance(memory.pool, ReplayBuffer)
    for _ in range(2):
        memory.synthesize(tiny_student()), disk.synthesize(tiny_student())
    assert disk.pool.images is None and (tmp_path / "replay" / "rank_0" / "shard_000000.npy").is_file()
    a, b = memory.build_source(8), disk.build_source(8)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch().images, b.next_batch().images)
    state = copy.deepcopy(disk.state_dict())
    resumed = make(seed=9, replay_dtype="float16", replay_storage="disk", replay_dir=str(tmp_path / "replay"))
    resumed.load_state_dict(state)
    out_a, out_b = disk.synthesize(tiny_student()), resumed.synthesize(tiny_student())
    assert torch.equal(out_a.images, out_b.images) and len(resumed.pool) == 96
    with pytest.raises(ConfigError, match="replay_dir"):
        CMI(CMIConfig(**{**SMALL, "replay_storage": "disk"}), tiny_teacher(), image_shape=(1, 8, 8), num_classes=10,
            context=SynthesisContext(**DIGITS))


def test_bad_configs_and_shapes_are_errors():
    with pytest.raises(ConfigError, match="at least one positive"):
        CMIConfig(bn_weight=0, one_hot_weight=0, adversarial_weight=0, contrastive_weight=0).validate()
    with pytest.raises(ConfigError, match="local_crop_scale"):
        CMIConfig(local_crop_scale=[0.5, 1.5]).validate()
    with pytest.raises(ConfigError, match="channel"):  # CIFAR-10 normalisation on 1-channel images
        CMI(CMIConfig(**SMALL), tiny_teacher(), image_shape=(1, 8, 8), num_classes=10,
            context=SynthesisContext(image_mean=[0.4914, 0.4822, 0.4465], image_std=[0.2, 0.2, 0.2]))
    with pytest.raises(ConfigError, match="set image_mean and image_std in the recipe"):  # no normalisation known
        CMI(CMIConfig(**SMALL), tiny_teacher(), image_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match="sigmoid_generator"):
        CMI(CMIConfig(**{**SMALL, "generator": "generator_a"}), tiny_teacher(), image_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match="image_size"):
        CMI.check_image_shape(CMIConfig(**SMALL), (1, 10, 10))
    torch.manual_seed(0)
    lenet = build_model("lenet5", 10, in_channels=1).eval().requires_grad_(False)
    with pytest.raises(ConfigError, match="BatchNorm"):
        CMI(CMIConfig(**SMALL), lenet, image_shape=(1, 32, 32), num_classes=10)


def test_teacher_and_student_are_untouched_and_modes_restored():
    teacher, student = tiny_teacher(), tiny_student().train()
    before = _snapshot(student)
    make(teacher).synthesize(student)
    assert student.training and not teacher.training and _equal(before, _snapshot(student))


def test_digits_recipe_loads():
    config, method = load_recipe(REPO / "recipes" / "digits" / "cmi.yaml")
    assert config.method == "cmi" and isinstance(method, CMIConfig) and config.image_mean == [0.3056]
    for name in ("cmi500_wrn40_2_to_wrn16_1.yaml",):
        for dataset in ("cifar10", "cifar100"):
            config, method = load_recipe(REPO / "recipes" / dataset / name)
            assert (config.teacher, config.student, method.synthesis_iterations) == ("wrn40_2", "wrn16_1", 500)


def test_short_real_digits_run_beats_chance(tmp_path):
    """60 student steps, 2 rounds of 40 inversion iterations on 64 images (a narrow generator, ngf 16, and
    a 10x larger generator LR so that a round converges in 40 iterations), on the built-in digits teacher
    (about 98.9 % top-1), evaluated on the held-out digits. Observed: 70.9 % (chance: 10 %); 3 rounds of
    30 iterations gave 60.0 %."""
    cfg = CMIConfig(per_device_synthesis_batch_size=64, synthesis_iterations=40, student_steps_per_round=30, ngf=16,
                    generator_lr=1e-2, augment_padding=1, kd_augment_padding=1)  # normalisation: the eval set's
    results = short_digits_run(tmp_path, "cmi", cfg, max_steps=60)
    assert results["student_top1"] >= 45, results["student_top1"]


def test_distiller_resume_with_the_pool_on_disk_is_bit_identical(tmp_path):
    """A run whose pool lives on disk (OUTPUT_DIR/replay/rank_0), resumed from its mid-run checkpoint
    after it had gone on writing rounds, ends with the same student as the uninterrupted run."""
    from safetensors.torch import load_file

    from accelerate_dfkd import Distiller
    from accelerate_dfkd.config import DistillConfig

    out = tmp_path / "run"

    def run(resume=None):
        config = DistillConfig(method="cmi", output_dir=str(out), max_steps=6, save_steps=3, eval_steps=0,
                               report_to="none", progress_bar=False, teacher_checkpoint="python",
                               eval_dataset="none", per_device_train_batch_size=16, resume_from_checkpoint=resume,
                               **DIGITS)
        method = CMIConfig(**{**SMALL, "student_steps_per_round": 2, "replay_storage": "disk", "pool_capacity": 48})
        return Distiller(config, method, teacher=tiny_teacher(), student=tiny_student()).train()

    run()
    uninterrupted = load_file(str(out / "student.safetensors"))
    assert (out / "replay" / "rank_0" / "shard_000000.npy").is_file()
    results = run(resume=str(out / "checkpoints" / "step_000003"))
    assert results["steps"] == 6
    resumed = load_file(str(out / "student.safetensors"))
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
