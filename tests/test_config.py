"""Recipes and command-line overrides: typed, validated, with did-you-mean errors."""

import pytest

from accelerate_dfkd.config import ConfigError, load_recipe, parse_overrides

from .conftest import REPO


def test_recipe_loads_and_overrides_apply():
    cfg, method = load_recipe(REPO / "recipes/digits/dfad.yaml",
                              parse_overrides(["--max_steps", "20", "--nz=8", "--lr_milestones", "[5, 10]"]))
    assert cfg.max_steps == 20 and method.nz == 8 and cfg.lr_milestones == [5, 10]
    assert cfg.teacher_checkpoint == "pretrained:digits"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="Did you mean 'max_steps'"):
        load_recipe(REPO / "recipes/digits/dfad.yaml", {"max_step": "3"})
    with pytest.raises(ConfigError, match="Did you mean 'generator_lr'"):
        load_recipe(REPO / "recipes/digits/dfad.yaml", {"generator_lrr": "3"})


def test_bad_values_are_named():
    recipe = REPO / "recipes/digits/dfad.yaml"
    with pytest.raises(ConfigError, match="max_steps must be int"):
        load_recipe(recipe, {"max_steps": "ten"})
    with pytest.raises(ConfigError, match="mixed_precision='fp8' is not one of"):
        load_recipe(recipe, {"mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="unknown method 'dfda'.*Did you mean 'dfad'"):
        load_recipe(recipe, {"method": "dfda"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(REPO / "recipes/nope.yaml")
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--max_steps"])
    with pytest.raises(ConfigError, match="must be positive"):
        load_recipe(recipe, {"max_steps": "0"})


def test_booleans_and_optionals():
    cfg, _ = load_recipe(REPO / "recipes/digits/dfad.yaml", {"progress_bar": "false", "max_grad_norm": "none"})
    assert cfg.progress_bar is False and cfg.max_grad_norm is None
