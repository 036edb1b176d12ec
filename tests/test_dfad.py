"""DFAD: conformance, and the details of its faithful defaults."""

import pytest
import torch

from accelerate_dfkd.config import ConfigError
from accelerate_dfkd.methods.dfad import DFAD, DFADConfig
from accelerate_dfkd.synthesis import SynthesisContext

from .conformance import SynthesizerConformance
from .conftest import tiny_student, tiny_teacher


class TestDFADConformance(SynthesizerConformance):
    loss_terms = {"adversarial_weight": 1.0}
    # in train() mode the copy would use batch statistics and differ from the eval() teacher
    equal_student_overrides = {"student_mode_in_synthesis": "eval"}

    def make_synthesizer(self, teacher, seed=0, **overrides):
        torch.manual_seed(0)
        cfg = DFADConfig(nz=16, ngf=8, per_device_synthesis_batch_size=16, **overrides)
        return DFAD(cfg, teacher, image_shape=self.image_shape, num_classes=10, context=SynthesisContext(seed=seed))


def test_defaults_follow_the_reference():
    cfg = DFADConfig()
    assert (cfg.student_loss, cfg.student_steps_per_round, cfg.generator_steps) == ("l1", 5, 1)
    assert (cfg.generator, cfg.nz, cfg.generator_lr, cfg.per_device_synthesis_batch_size) == ("generator_a", 256, 1e-3, 256)


def test_generator_maximises_the_discrepancy():
    """A few generator steps against a fixed student raise the teacher-student L1."""
    torch.manual_seed(0)
    teacher, student = tiny_teacher(), tiny_student()
    synth = DFAD(DFADConfig(nz=16, ngf=8, per_device_synthesis_batch_size=64, generator_lr=1e-2), teacher,
                 image_shape=(1, 8, 8), num_classes=10)
    first = -float(synth.synthesize(student).losses["adversarial"])
    for _ in range(20):
        last = -float(synth.synthesize(student).losses["adversarial"])
    assert last > first * 1.2, (first, last)


def test_segmentation_uses_log_loss():
    torch.manual_seed(0)

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 3, 1)

        def forward(self, x):
            return self.conv(x)

    teacher = Dense().eval().requires_grad_(False)
    synth = DFAD(DFADConfig(nz=8, ngf=8, per_device_synthesis_batch_size=4), teacher, image_shape=(1, 8, 8),
                 num_classes=3, task="segmentation")
    out = synth.synthesize(Dense())
    assert out.losses["adversarial"] <= 0 and out.losses["adversarial"] > -1.0  # -log(1 + L1) on a small L1


def test_image_shape_the_generator_cannot_make_is_a_config_error():
    with pytest.raises(ConfigError, match="image_size=10 cannot be produced"):
        DFAD(DFADConfig(nz=8, ngf=8), tiny_teacher(), image_shape=(1, 10, 10), num_classes=10)


def test_student_mode_option():
    teacher, student = tiny_teacher(), tiny_student()
    student.train()
    bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    synth = DFAD(DFADConfig(nz=8, ngf=8, per_device_synthesis_batch_size=8, student_mode_in_synthesis="eval"),
                 teacher, image_shape=(1, 8, 8), num_classes=10)
    synth.synthesize(student)
    assert torch.equal(before, bn.running_mean) and student.training
