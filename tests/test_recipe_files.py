"""Every recipe in recipes/ parses through the real loaders (unknown keys, bad values and failed
validation are errors), including those that cannot run on this machine (GPU schedules, models or data
that are not here). Launch topologies (recipes/accelerate/) are accelerate config files, not recipes."""

from pathlib import Path

import pytest

from accelerate_dfkd.config import ConfigError, build_configs, load_recipe, read_recipe
from accelerate_dfkd.methods import METHODS
from accelerate_dfkd.train_teacher import TeacherTrainingConfig

from .conftest import REPO

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(REPO).parts)


def test_recipes_are_found():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"digits/dfad.yaml", "digits/fast_dfkd.yaml", "cifar10/fast5_resnet56_to_resnet20.yaml",
            "imagenet/fast50_resnet50_to_resnet50.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_recipe_parses(path: Path):
    if path.name.startswith("teacher_"):  # `accelerate-dfkd train-teacher` recipes
        (config,) = build_configs(read_recipe(path), [TeacherTrainingConfig], f" in {path}")
        assert config is not None
        return
    config, method_config = load_recipe(path)
    method = METHODS[config.method]
    assert isinstance(method_config, method.config_class)
    # The CLI's first check: can the method make images of this shape? Recipes for models that are not in
    # our zoo (the ImageNet settings written out from the papers) say so and fail here, as the CLI would.
    shape = (config.in_channels, config.image_size, config.image_size)
    if "CANNOT RUN" in path.read_text():
        with pytest.raises(ConfigError):
            method.check_image_shape(method_config, shape)
    else:
        method.check_image_shape(method_config, shape)


@pytest.mark.parametrize("path", [p for p in RECIPES if not p.name.startswith("teacher_")],
                         ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_pixel_generator_recipes_know_the_teachers_normalisation(path: Path):
    """A method whose generator makes [0, 1] images normalises them with the run's image_mean / image_std
    (SynthesisContext): the recipe states it, or its eval set does (evaluation.resolve_input_normalization)."""
    from accelerate_dfkd.models import build_generator

    config, method_config = load_recipe(path)
    name = getattr(method_config, "generator", None)
    if config.method not in ("cmi", "fast_dfkd", "ssd_kd") or "CANNOT RUN" in path.read_text():
        return
    generator = build_generator(name, nz=8, image_size=config.image_size, channels=config.in_channels, ngf=4)
    if generator.output_space == "pixel":
        assert config.image_mean is not None or config.eval_dataset != "none", (
            f"{path.name}: set image_mean and image_std (the teacher's input normalisation)")
        if config.image_mean is not None:
            assert len(config.image_mean) in (1, config.in_channels) and len(config.image_std) == len(config.image_mean)
