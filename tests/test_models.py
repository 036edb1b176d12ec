"""Model zoo, generators and checkpoint loading."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from accelerate_dfkd.models import (
    GENERATORS,
    MODELS,
    SEGMENTATION_MODELS,
    build_generator,
    build_model,
    load_checkpoint_into,
    load_state_dict_file,
)

torch.set_num_threads(1)

DATA_DIR = Path(os.environ.get("DFKD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
AKAMASTER = DATA_DIR / "teachers" / "cifar10-resnet-akamaster"
# File name -> (model name, parameter count); the 8 hex digits in the name start its sha256.
AKAMASTER_FILES = {
    "resnet20-12fca82f.th": ("resnet20", 269_722),
    "resnet56-4bfd9763.th": ("resnet56", 853_018),
}


def _input_shape(name: str) -> tuple[int, int, int]:
    if name.startswith("lenet"):
        return (1, 32, 32)
    if name.startswith("digits"):
        return (1, 8, 8)
    return (3, 32, 32)


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", sorted(set(MODELS) - SEGMENTATION_MODELS))  # dense ones: test_segmentation.py
def test_model_gives_logits_and_last_linear_is_classifier(name: str, num_classes: int) -> None:
    c, h, w = _input_shape(name)
    model = build_model(name, num_classes=num_classes, in_channels=c)
    feats: list[torch.Tensor] = []
    head = _last_linear(model)
    handle = head.register_forward_hook(lambda mod, inp, out: feats.append(inp[0]))
    logits = model(torch.randn(2, c, h, w))
    handle.remove()
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    assert head.out_features == num_classes
    assert feats[0].shape == (2, head.in_features)


@pytest.mark.parametrize("name", ["resnet20", "wrn16_1", "resnet18_8x", "vgg11_bn"])
def test_cifar_models_accept_other_resolutions(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=3).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_digits_models_accept_larger_inputs_and_have_bn_stats() -> None:
    teacher = build_model("digits_cnn", 10, in_channels=1)
    student = build_model("digits_cnn_small", 10, in_channels=1)
    assert teacher(torch.randn(4, 1, 16, 16)).shape == (4, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    # The forward pass in train mode moved the running statistics away from their init.
    bn = next(m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert 10_000 < _n_params(teacher) < 100_000
    assert 3_000 <= _n_params(student) <= 4_000


def test_lenet_rejects_unpadded_mnist_and_sizes() -> None:
    model = build_model("lenet5", 10, in_channels=1)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 1, 28, 28))
    assert _n_params(model) == 61_706
    assert _n_params(build_model("lenet5_half", 10, in_channels=1)) < _n_params(model) / 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_resnet_param_counts_match_akamaster() -> None:
    assert _n_params(build_model("resnet20", 10)) == 269_722
    assert _n_params(build_model("resnet56", 10)) == 853_018


def test_unknown_model_suggests_close_name() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet2O", num_classes=10)
    msg = str(info.value)
    assert "Did you mean 'resnet20'?" in msg
    assert "wrn40_2" in msg  # known names are listed
    with pytest.raises(ValueError, match="generator_a"):
        build_generator("generatr_a", nz=8, image_size=32, channels=3)


# --------------------------------------------------------------------------- checkpoints


def _akamaster_file(fname: str) -> Path:
    path = AKAMASTER / fname
    if not path.is_file():
        pytest.skip(f"pretrained teacher {path} absent (set DFKD_DATA_DIR to the shared data folder)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest.startswith(fname.split("-")[1].split(".")[0]), f"{path}: sha256 {digest} mismatch"
    return path


@pytest.mark.parametrize("fname", sorted(AKAMASTER_FILES))
def test_akamaster_checkpoint_loads_strictly(fname: str) -> None:
    path = _akamaster_file(fname)
    name, n_params = AKAMASTER_FILES[fname]
    model = build_model(name, num_classes=10)
    state = load_state_dict_file(path)
    assert not any(k.startswith("module.") for k in state)
    load_checkpoint_into(model, path)
    assert _n_params(model) == n_params
    assert torch.equal(model.linear.weight, state["linear.weight"])
    # The only keys the checkpoint lacks are the tolerated BN step counters.
    missing = set(model.state_dict()) - set(state)
    assert missing and all(k.endswith("num_batches_tracked") for k in missing)
    if name == "resnet56":
        model.eval()
        with torch.no_grad():
            logits = model(torch.randn(4, 3, 32, 32))
        assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_mismatched_checkpoint_names_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20", 10).state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_checkpoint_into(build_model("resnet32", 10), path)
    msg = str(info.value)
    assert "missing keys" in msg and "layer1.3.conv1.weight" in msg
    assert "CifarResNet" in msg and "--teacher <name>" in msg

    with pytest.raises(ValueError, match="unexpected keys"):
        load_checkpoint_into(build_model("resnet20", 10), build_model("resnet32", 10).state_dict())
    with pytest.raises(ValueError, match=r"linear.weight: checkpoint \(100, 64\) vs model \(10, 64\)"):
        load_checkpoint_into(build_model("resnet20", 10), build_model("resnet20", 100).state_dict())


def test_akamaster_format_without_counters_is_tolerated(tmp_path: Path) -> None:
    """DataParallel prefix, {'state_dict': ...} wrapper, no num_batches_tracked: loads."""
    src = build_model("resnet20", 10)
    wrapped = {
        "state_dict": {f"module.{k}": v for k, v in src.state_dict().items() if "num_batches" not in k},
        "best_prec1": 91.7,
    }
    path = tmp_path / "ckpt.th"
    torch.save(wrapped, path)
    dst = build_model("resnet20", 10)
    load_checkpoint_into(dst, path, what="student")
    for k, v in src.state_dict().items():
        if "num_batches" not in k:
            assert torch.equal(dst.state_dict()[k], v), k


def test_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = build_model("wrn16_1", 10).eval()
    path = tmp_path / "wrn.safetensors"
    save_file(src.state_dict(), str(path))
    dst = build_model("wrn16_1", 10).eval()
    load_checkpoint_into(dst, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_missing_file_and_pickled_module_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict_file(tmp_path / "nope.pt")
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
    with pytest.raises(ValueError, match="state_dict"):
        load_state_dict_file(path)


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name,size", [(g, 32) for g in sorted(GENERATORS)] + [("generator_a", 8)])
def test_generator_output_shape(name: str, size: int, channels: int) -> None:
    gen = build_generator(name, nz=16, image_size=size, channels=channels, ngf=8)
    out = gen(torch.randn(4, 16))
    assert out.shape == (4, channels, size, size)
    assert gen.output_space in {"normalized", "tanh", "pixel"}


def test_generator_output_spaces() -> None:
    z = torch.randn(64, 32)
    gen_a = build_generator("generator_a", nz=32, image_size=16, channels=3, ngf=16).train()
    out = gen_a(z)
    assert gen_a.output_space == "normalized"
    assert out.mean().abs() < 0.05 and (out.std() - 1).abs() < 0.05

    gen_b = build_generator("generator_b", nz=32, image_size=16, channels=3, ngf=8)
    out = gen_b(z)
    assert gen_b.output_space == "tanh" and out.min() >= -1 and out.max() <= 1

    gen_s = build_generator("sigmoid_generator", nz=32, image_size=16, channels=3, ngf=16)
    out = gen_s(z)
    assert gen_s.output_space == "pixel" and out.min() >= 0 and out.max() <= 1


def test_generator_default_width_and_eval_mode() -> None:
    gen = build_generator("generator_a", nz=100, image_size=32, channels=3).eval()
    with torch.no_grad():
        assert gen(torch.randn(2, 100)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    "name,bad", [("generator_a", 30), ("generator_b", 24), ("sigmoid_generator", 10)]
)
def test_generator_bad_image_size(name: str, bad: int) -> None:
    with pytest.raises(ValueError, match="divisible by"):
        build_generator(name, nz=8, image_size=bad, channels=3)
