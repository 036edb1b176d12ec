"""The teacher's input normalisation has one source of truth: evaluation.resolve_input_normalization
(recipe image_mean / image_std > the teacher's declared image_mean / image_std > the eval set's), which
the Distiller, the Trainer integration and the `synthesize` export hand to the synthesizer through
SynthesisContext."""

import pytest
import torch

from accelerate_dfkd import Distiller
from accelerate_dfkd.config import ConfigError, DistillConfig
from accelerate_dfkd.evaluation import (DIGITS_MEAN, DIGITS_STD, LabeledImages, recipe_input_normalization,
                                        resolve_input_normalization)
from accelerate_dfkd.integrations.trainer import build_synthesizer
from accelerate_dfkd.synthesis import SynthesisContext

from .conftest import small_configs, tiny_student, tiny_teacher

RECIPE = ([0.1], [0.2])
TEACHER = (0.3,), (0.4,)
EVAL = (0.5,), (0.6,)


def declaring_teacher() -> torch.nn.Module:
    """A real teacher that states its normalisation, as a transformers model does (integrations/hf_models.py)."""
    teacher = tiny_teacher()
    teacher.image_mean, teacher.image_std = TEACHER
    return teacher


def eval_set() -> LabeledImages:
    return LabeledImages(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), "probe", *EVAL)


def test_resolution_order_recipe_then_teacher_then_eval_set():
    assert resolve_input_normalization(*RECIPE, declaring_teacher(), eval_set()) == ((0.1,), (0.2,))
    assert resolve_input_normalization(None, None, declaring_teacher(), eval_set()) == TEACHER
    assert resolve_input_normalization(None, None, tiny_teacher(), eval_set()) == EVAL
    assert resolve_input_normalization(None, None, tiny_teacher(), None) is None
    unknown = LabeledImages(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), "unknown")
    assert resolve_input_normalization(None, None, None, unknown) is None
    with pytest.raises(ConfigError, match="go together"):
        resolve_input_normalization([0.1], None)


def test_distiller_hands_the_resolved_normalisation_to_the_synthesizer(tmp_path):
    config, method = small_configs(tmp_path / "a", max_steps=1)
    distiller = Distiller(config, method, teacher=declaring_teacher(), student=tiny_student(), eval_data=eval_set())
    assert (distiller.synthesizer.context.image_mean, distiller.synthesizer.context.image_std) == TEACHER
    config, method = small_configs(tmp_path / "b", max_steps=1, image_mean=RECIPE[0], image_std=RECIPE[1])
    distiller = Distiller(config, method, teacher=declaring_teacher(), student=tiny_student(), eval_data=eval_set())
    assert distiller.synthesizer.context.image_mean == (0.1,)
    config, method = small_configs(tmp_path / "c", max_steps=1)
    distiller = Distiller(config, method, teacher=tiny_teacher(), student=tiny_student())
    assert distiller.synthesizer.context.image_mean is None and distiller.synthesizer.context.normalization(1) is None


def test_recipe_without_its_eval_set_in_memory_resolves_the_same(tmp_path):
    digits = DistillConfig(eval_dataset="digits")
    assert recipe_input_normalization(digits, tiny_teacher()) == ((DIGITS_MEAN,), (DIGITS_STD,))
    assert recipe_input_normalization(digits, declaring_teacher()) == TEACHER
    assert recipe_input_normalization(DistillConfig(eval_dataset="none"), tiny_teacher()) is None
    missing = DistillConfig(eval_dataset="mnist", data_dir=str(tmp_path))  # no IDX files there: unknown
    assert recipe_input_normalization(missing, tiny_teacher()) is None


def test_context_normalization_tensors_and_errors():
    mean, std = SynthesisContext(image_mean=[0.5], image_std=[0.25]).normalization(3)
    assert mean.shape == std.shape == (1, 3, 1, 1) and torch.equal(std.flatten(), torch.full((3,), 0.25))
    with pytest.raises(ConfigError, match="positive"):
        SynthesisContext(image_mean=[0.5], image_std=[0.0])
    with pytest.raises(ConfigError, match="set image_mean and image_std in the recipe"):
        SynthesisContext().normalization(1, required_by="a sigmoid generator")


def test_build_synthesizer_takes_the_normalisation_or_the_teachers():
    small = dict(nz=16, ngf=8, per_device_synthesis_batch_size=8, warmup_rounds=0, generator_steps=1)
    synth = build_synthesizer("fast_dfkd", tiny_teacher(), image_shape=(1, 8, 8), num_classes=10,
                              image_mean=[DIGITS_MEAN], image_std=[DIGITS_STD], **small)
    assert synth.context.image_mean == (DIGITS_MEAN,)
    expected = torch.full((1, 1, 8, 8), (1 - DIGITS_MEAN) / DIGITS_STD)
    assert torch.allclose(synth.normalize(torch.ones(1, 1, 8, 8)), expected)
    synth = build_synthesizer("fast_dfkd", declaring_teacher(), image_shape=(1, 8, 8), num_classes=10, **small)
    assert synth.context.image_mean == TEACHER[0]
    with pytest.raises(ConfigError, match="set image_mean and image_std in the recipe"):
        build_synthesizer("fast_dfkd", tiny_teacher(), image_shape=(1, 8, 8), num_classes=10, **small)
