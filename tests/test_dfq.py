"""DFQ: conformance, its cited defaults, the BatchNorm refusal, and a short real-data run."""

import pytest
import torch

from accelerate_dfkd.config import ConfigError
from accelerate_dfkd.methods.dfq import DFQ, DFQConfig
from accelerate_dfkd.models import build_model
from accelerate_dfkd.synthesis import SynthesisContext

from .conformance import SynthesizerConformance
from .conftest import short_digits_run, tiny_student, tiny_teacher


class TestDFQConformance(SynthesizerConformance):
    loss_terms = {"adversarial_weight": 1.0, "bn_weight": 1.0, "one_hot_weight": 1.0, "balance_weight": 1.0}
    equal_student_overrides = {"student_mode_in_synthesis": "eval"}

    def make_synthesizer(self, teacher, seed=0, **overrides):
        torch.manual_seed(0)
        cfg = DFQConfig(nz=16, ngf=8, per_device_synthesis_batch_size=16, **overrides)
        return DFQ(cfg, teacher, image_shape=self.image_shape, num_classes=10, context=SynthesisContext(seed=seed))


def test_defaults_follow_the_zju_vipa_script():
    cfg = DFQConfig()
    assert (cfg.student_loss, cfg.temperature, cfg.student_steps_per_round, cfg.generator_steps) == ("kl", 1.0, 10, 1)
    assert (cfg.generator, cfg.nz, cfg.ngf, cfg.per_device_synthesis_batch_size) == ("generator_a", 256, 64, 256)
    assert (cfg.generator_lr, cfg.generator_beta1, cfg.generator_beta2) == (1e-3, 0.5, 0.999)
    assert (cfg.adversarial_weight, cfg.bn_weight, cfg.one_hot_weight, cfg.balance_weight) == (1.0, 1.0, 1.0, 20.0)
    assert cfg.student_mode_in_synthesis == "eval" and cfg.sample_generator_in_train_mode
    assert not DFQ.needs_batchnorm_teacher  # checked per instance: bn_weight 0 is allowed


def test_logs_every_term_separately():
    synth = DFQ(DFQConfig(nz=16, ngf=8, per_device_synthesis_batch_size=16), tiny_teacher(), image_shape=(1, 8, 8),
                num_classes=10)
    out = synth.synthesize(tiny_student())
    assert set(out.losses) == {"adversarial", "bn_stats", "one_hot", "balance"}
    assert out.losses["bn_stats"] > 0 and out.losses["adversarial"] <= 0 and out.losses["balance"] <= 0


def test_teacher_without_batchnorm_is_refused_unless_bn_weight_is_zero():
    torch.manual_seed(0)
    lenet = build_model("lenet5", 10, in_channels=1).eval().requires_grad_(False)
    small = dict(nz=8, ngf=4, per_device_synthesis_batch_size=4)
    with pytest.raises(ConfigError, match="needs a teacher with BatchNorm.*--bn_weight 0"):
        DFQ(DFQConfig(**small), lenet, image_shape=(1, 32, 32), num_classes=10)
    synth = DFQ(DFQConfig(bn_weight=0.0, **small), lenet, image_shape=(1, 32, 32), num_classes=10)
    out = synth.synthesize(build_model("lenet5_half", 10, in_channels=1))
    assert "bn_stats" not in out.losses and out.images.shape == (4, 1, 32, 32)
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_bad_weights_and_pixel_generators_are_config_errors():
    with pytest.raises(ConfigError, match="at least one positive"):
        DFQConfig(adversarial_weight=0, bn_weight=0, one_hot_weight=0, balance_weight=0).validate()
    with pytest.raises(ConfigError, match="bn_weight"):
        DFQConfig(bn_weight=-1).validate()
    with pytest.raises(ConfigError, match="normalisation"):
        DFQ.check_image_shape(DFQConfig(generator="sigmoid_generator"), (1, 8, 8))


def test_short_real_digits_run_beats_chance(tmp_path):
    """80 student steps (8 generator steps) on the built-in digits teacher (about 98.9 % top-1).
    Observed: 59.6 % on the held-out digits (seeds 0-2: 49-60 %; chance: 10 %)."""
    results = short_digits_run(tmp_path, "dfq", DFQConfig(per_device_synthesis_batch_size=128), max_steps=80)
    assert results["student_top1"] >= 30, results["student_top1"]
