"""Golden values for the pure loss terms and the BatchNorm-statistics hook, computed by hand."""

import math

import pytest
import torch

from accelerate_dfkd import losses
from accelerate_dfkd.hooks import BatchNormStatistics, FeatureCapture, frozen, last_linear, training_mode


def test_kd_kl_golden_t1():
    # p_t = (0.75, 0.25), p_s = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    t = torch.tensor([[math.log(3.0), 0.0]])
    s = torch.zeros(1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert losses.kd_kl(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_kd_kl_golden_temperature_scales_by_t_squared():
    t = torch.tensor([[math.log(3.0), 0.0]])
    s = torch.zeros(1, 2)
    a = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax of (ln 3 / 2, 0)
    expected = 4 * (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert losses.kd_kl(s, t, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_kd_kl_is_zero_for_equal_logits_and_weights_apply():
    x = torch.randn(4, 10)
    assert losses.kd_kl(x, x, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    s = torch.zeros(2, 2)
    per_sample = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    weighted = losses.kd_kl(s, t, 1.0, weights=torch.tensor([2.0, 0.0]))
    assert weighted.item() == pytest.approx(per_sample, abs=1e-6)  # (2 * k + 0) / N with N = 2


def test_l1_logits_golden_and_weighted():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 8.0]])
    assert losses.l1_logits(s, t).item() == pytest.approx(2.5)
    assert losses.l1_logits(s, t, weights=torch.tensor([2.0, 0.0])).item() == pytest.approx(1.5)


def test_dfad_generator_loss_golden():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 8.0]])
    assert losses.dfad_generator_loss(s, t).item() == pytest.approx(-2.5)
    assert losses.dfad_generator_loss(s, t, dense=True).item() == pytest.approx(-math.log(3.5))


def test_losses_run_in_float32_under_half_inputs():
    s = torch.full((2, 3), 60000.0, dtype=torch.float16)
    t = torch.full((2, 3), -60000.0, dtype=torch.float16)
    value = losses.l1_logits(s, t)  # 120000 overflows float16
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert losses.kd_kl(s, t, 20.0).dtype == torch.float32


def test_js_divergence_and_batch_entropy_golden():
    p = torch.tensor([[math.log(3.0), 0.0]])
    q = torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # both halves equal by symmetry
    assert losses.js_divergence(p, q).item() == pytest.approx(expected, abs=1e-5)
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    assert losses.batch_entropy(logits).item() == pytest.approx(math.log(2.0), abs=1e-6)
    # a class with probability 0 must not produce NaN (the reference's hazard)
    assert torch.isfinite(losses.batch_entropy(torch.tensor([[1000.0, -1000.0]])))


def _one_bn() -> torch.nn.Module:
    bn = torch.nn.BatchNorm2d(1)
    bn.running_mean.fill_(0.0)
    bn.running_var.fill_(1.0)
    return torch.nn.Sequential(bn).eval()


def test_batchnorm_statistics_golden_and_hooks_removed():
    model = _one_bn()
    x = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)  # batch mean 2, biased variance 1
    with BatchNormStatistics(model) as bn:
        model(x)
        assert bn.loss().item() == pytest.approx(2.0)  # |0 - 2| + |1 - 1|
    with BatchNormStatistics(model, first_layer_weight=3.0) as bn:
        model(x)
        assert bn.loss().item() == pytest.approx(6.0)
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_are_removed_on_error_and_bn_less_models_are_refused():
    model = _one_bn()
    with pytest.raises(RuntimeError):
        with BatchNormStatistics(model):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BatchNormStatistics(torch.nn.Linear(2, 2))


def test_feature_capture_frozen_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with FeatureCapture(last_linear(model), capture="input") as feats:
        model(torch.randn(5, 4))
    assert feats.value.shape == (5, 3)
    assert all(not m._forward_hooks for m in model.modules())
    model[0].weight.requires_grad_(False)
    with frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    model.train()
    with training_mode(model, False):
        assert not model.training
    assert model.training
