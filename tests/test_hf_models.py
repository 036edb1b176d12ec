"""transformers models as teacher or student (integrations/hf_models.py), offline.

Tiny real transformers models (ResNet, RegNet, MobileNetV2, ViT, Segformer) are built from configs,
written with save_pretrained and read back through `hf:<dir>`, as a user's saved model would be.
The ResNet teacher is trained on digits for real (about 2 s), in the input space of a typical image
processor (mean 0.5, std 0.5 at 16x16), so the CLI runs check that evaluation images reach it in that
space and at that size: in the digits' own normalisation it scores about 8 points lower.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from accelerate_dfkd import cli  # noqa: E402
from accelerate_dfkd.config import ConfigError  # noqa: E402
from accelerate_dfkd.evaluation import evaluate_classifier, load_digits_split  # noqa: E402
from accelerate_dfkd.hooks import BatchNormStatistics, has_batchnorm  # noqa: E402
from accelerate_dfkd.integrations.hf_models import (HFImageModel, load_hf_model,  # noqa: E402
                                                    pixel_normalization)
from accelerate_dfkd.teachers import load_student, load_teacher, train_classifier  # noqa: E402

from .conftest import PYTHON, REPO, cli_env  # noqa: E402

TEACHER_MEAN, TEACHER_STD = (0.5,), (0.5,)  # ViTImageProcessor's defaults, not the digits' statistics
FAST = ["--per_device_train_batch_size", "32", "--report_to", "none", "--progress_bar", "false",
        "--logging_steps", "5", "--save_steps", "0", "--image_grid_rounds", "0", "--lr_scheduler", "constant"]


def tiny_resnet(channels: int = 1, labels: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(num_channels=channels, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       layer_type="basic", num_labels=labels)
    return transformers.ResNetForImageClassification(config)


def tiny_vit(image_size: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=image_size, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_channels=1, num_labels=10)
    return transformers.ViTForImageClassification(config)


@pytest.fixture(scope="session")
def hf_teacher_dir(tmp_path_factory):
    """A tiny transformers ResNet trained on digits at 16x16 in the (0.5, 0.5) space, saved with
    save_pretrained and a preprocessor_config.json (about 97% on the held-out digits)."""
    path = tmp_path_factory.mktemp("hf") / "resnet_teacher"
    model = HFImageModel(tiny_resnet())
    data = load_digits_split("train", 16).renormalized(TEACHER_MEAN, TEACHER_STD)
    train_classifier(model, data, epochs=3, lr=1e-2, seed=0)
    model.save_pretrained(path, image_mean=TEACHER_MEAN, image_std=TEACHER_STD, image_size=16)
    return path


def run_cli(*args: str, check: bool = True):
    import subprocess

    env = cli_env()
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([PYTHON, "-m", "accelerate_dfkd", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# --- loading ------------------------------------------------------------------------------------
def test_saved_model_loads_with_its_image_processor(hf_teacher_dir):
    teacher = load_teacher(f"hf:{hf_teacher_dir}", None, num_classes=10, in_channels=1, image_size=8)
    assert isinstance(teacher, HFImageModel) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.native_size == (16, 16) and teacher.image_mean == TEACHER_MEAN and teacher.image_std == TEACHER_STD
    raw = transformers.AutoModelForImageClassification.from_pretrained(str(hf_teacher_dir)).eval()
    x = torch.randn(4, 1, 16, 16)
    out = teacher(x)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, raw(pixel_values=x).logits, atol=1e-6)
    # 8x8 input (the recipe's size) is resized to the 16x16 the teacher was trained at, differentiably
    x8 = torch.randn(2, 1, 8, 8, requires_grad=True)
    expected = raw(pixel_values=torch.nn.functional.interpolate(x8, size=(16, 16), mode="bilinear")).logits
    logits = teacher(x8)
    assert torch.allclose(logits, expected, atol=1e-5)
    logits.sum().backward()
    assert x8.grad is not None and x8.grad.abs().sum() > 0
    # the teacher scores at both sizes on digits in its own input space
    for size in (8, 16):
        test = load_digits_split("test", size).renormalized(teacher.image_mean, teacher.image_std)
        assert evaluate_classifier(teacher, test, num_classes=10)["top1"] > 94


def test_pixel_normalization_reads_rescale_and_normalize():
    processor = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    def flat(pair):
        return [*pair[0], *pair[1]]

    assert flat(pixel_normalization(processor, 3)) == pytest.approx([0.485, 0.456, 0.406, 0.229, 0.224, 0.225])
    # no rescaling: the model saw 0..255 values normalised with mean 127.5, std 127.5 == (p - 0.5) / 0.5
    raw = {"do_rescale": False, "image_mean": [127.5], "image_std": [127.5]}
    assert flat(pixel_normalization(raw, 1)) == pytest.approx([0.5, 0.5])
    # rescaling without normalisation: pixels in [0, 1] as they are
    assert flat(pixel_normalization({"do_rescale": True, "do_normalize": False}, 3)) == pytest.approx([0] * 3 + [1] * 3)
    assert pixel_normalization({}, 3) is None
    with pytest.raises(ConfigError, match="normalises 3 channels but the model takes 1"):
        pixel_normalization(processor, 1)


@pytest.mark.parametrize("build", ["resnet", "regnet", "mobilenet_v2"])
def test_batchnorm_models_work_with_bn_statistics(tmp_path, build):
    torch.manual_seed(0)
    if build == "resnet":
        raw = tiny_resnet(channels=3)
    elif build == "regnet":
        raw = transformers.RegNetForImageClassification(transformers.RegNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=10))
    else:
        raw = transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(
            num_channels=3, image_size=16, depth_multiplier=0.25, num_labels=10))
    raw.train()
    with torch.no_grad():  # non-trivial running statistics
        raw(pixel_values=torch.randn(8, 3, 16, 16) * 2 + 1)
    raw.save_pretrained(tmp_path / build)
    teacher = load_teacher(f"hf:{tmp_path / build}", None, num_classes=10, in_channels=3, image_size=16)
    expected = sum(isinstance(m, torch.nn.BatchNorm2d) for m in raw.modules())
    assert expected > 0 and has_batchnorm(teacher)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    with BatchNormStatistics(teacher) as bn:
        teacher(x)
        loss = bn.loss()
    assert len(bn.layers) == expected and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert x.grad.abs().sum() > 0
    assert all(not h for m in teacher.modules() for h in (m._forward_hooks,)), "hooks left behind"


def test_vit_has_no_batchnorm():
    teacher = HFImageModel(tiny_vit())
    assert not has_batchnorm(teacher)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BatchNormStatistics(teacher)


def test_student_from_a_config_only_folder_and_a_new_head(tmp_path):
    tiny_resnet().config.save_pretrained(tmp_path / "config_only")  # config.json, no weights
    torch.manual_seed(0)
    a = load_student(f"hf:{tmp_path / 'config_only'}", None, num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(0)
    b = load_student(f"hf:{tmp_path / 'config_only'}", None, num_classes=10, in_channels=1, image_size=8)
    assert a.native_size is None and a.image_mean is None  # no image processor: runs at the recipe's size
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values())), "not seeded"
    # a pretrained student with 10 labels distilled for 5 classes: body kept, head re-initialised
    pretrained = tiny_resnet()
    pretrained.save_pretrained(tmp_path / "pretrained")
    five = load_student(f"hf:{tmp_path / 'pretrained'}", None, num_classes=5, in_channels=1, image_size=8)
    assert five(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    body = "resnet.embedder.embedder.convolution.weight"
    assert torch.equal(five.model.state_dict()[body], pretrained.state_dict()[body])
    # a state-dict file on top: our own saved naming (model. + transformers names) or the transformers one
    from safetensors.torch import save_file

    tuned = tiny_resnet(seed=3)
    save_file(tuned.state_dict(), str(tmp_path / "plain.safetensors"))
    save_file(HFImageModel(tuned).state_dict(), str(tmp_path / "ours.safetensors"))
    for name in ("plain", "ours"):
        s = load_student(f"hf:{tmp_path / 'pretrained'}", str(tmp_path / f"{name}.safetensors"), num_classes=10,
                         in_channels=1, image_size=8)
        assert torch.equal(s.model.state_dict()[body], tuned.state_dict()[body])


@pytest.mark.parametrize("spec, kwargs, message", [
    ("hf:", {}, "names no model"),
    ("hf:/nonexistent/model_dir", {}, "no config.json"),
    ("hf:some-org/not-cached-anywhere", {}, "HF_HUB_OFFLINE"),
    ("hf:{resnet}", {"in_channels": 3}, "--in_channels 1"),
    ("hf:{resnet}", {"num_classes": 7}, "--num_classes 10"),
    ("hf:{config_only}", {}, "has a config but no weights"),
    ("hf:{resnet}", {"checkpoint": "pretrained:digits"}, "--teacher_checkpoint none"),
    ("hf:{bert}", {}, "not a transformers image classification model"),
])
def test_bad_teachers_get_one_clear_error(tmp_path, spec, kwargs, message):
    tiny_resnet().save_pretrained(tmp_path / "resnet")
    tiny_resnet().config.save_pretrained(tmp_path / "config_only")
    transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                                   intermediate_size=8)).save_pretrained(tmp_path / "bert")
    spec = spec.format(resnet=tmp_path / "resnet", config_only=tmp_path / "config_only", bert=tmp_path / "bert")
    args = {"num_classes": 10, "in_channels": 1, **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        load_hf_model(spec, role="teacher", **args)
    if "not a transformers" not in message:  # one message, not a config error re-wrapped as another
        assert "not a transformers" not in str(err.value)


def test_segmentation_logits_come_at_the_input_size(tmp_path):
    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                          hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                                          num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
                                          num_labels=4)
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "seg")
    model = load_hf_model(f"hf:{tmp_path / 'seg'}", role="teacher", num_classes=4, in_channels=3,
                          task="segmentation").eval()
    raw = transformers.AutoModelForSemanticSegmentation.from_pretrained(str(tmp_path / "seg")).eval()
    x = torch.randn(2, 3, 32, 32)
    assert raw(pixel_values=x).logits.shape == (2, 4, 8, 8)  # transformers: 1/4 of the input
    assert model(x).shape == (2, 4, 32, 32)


# --- through the CLI, as users run it -------------------------------------------------------------
def test_hf_teacher_distils_through_the_cli_into_our_student(tmp_path, hf_teacher_dir):
    """`--teacher hf:<dir>` (16x16, mean/std 0.5) into the zoo's digits_cnn_small at 8x8 with DFAD."""
    out = tmp_path / "run"
    run_cli(str(REPO / "recipes/digits/dfad.yaml"), "--teacher", f"hf:{hf_teacher_dir}", "--teacher_checkpoint",
            "none", "--student", "digits_cnn_small", "--max_steps", "10", "--eval_steps", "5", "--nz", "16",
            "--ngf", "8", "--per_device_synthesis_batch_size", "32", "--output_dir", str(out), *FAST)
    results = json.loads((out / "results.json").read_text())
    # evaluated in the teacher's space and size: in the digits' own normalisation it would score ~89
    assert results["teacher_top1"] > 94 and results["teacher_scores"]["top5"] >= results["teacher_top1"]
    assert results["steps"] == 10 and 0 <= results["student_top1"] <= 100
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("eval/top5" in entry for entry in logged)


def test_hf_teacher_distils_into_an_hf_student_with_deepinversion(tmp_path, hf_teacher_dir):
    """A BN-statistics method on a transformers teacher, into a transformers student built from a
    config alone; the distilled student comes back through from_pretrained with the same score."""
    student_dir = tmp_path / "student_config"
    tiny_resnet(seed=1).config.save_pretrained(student_dir)
    out = tmp_path / "run"
    run_cli(str(REPO / "recipes/digits/deepinversion.yaml"), "--teacher", f"hf:{hf_teacher_dir}",
            "--teacher_checkpoint", "none", "--student", f"hf:{student_dir}", "--max_steps", "4",
            "--student_steps_per_round", "2", "--synthesis_iterations", "3", "--per_device_synthesis_batch_size", "16",
            "--pool_capacity", "64", "--pixel_min", "-1", "--pixel_max", "1", "--eval_steps", "0",
            "--output_dir", str(out), *FAST)
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_top1"] > 94 and results["synthesis_rounds"] == 2
    saved = out / "student_hf"
    processor = json.loads((saved / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5] and processor["size"] == {"height": 8, "width": 8}
    student = load_hf_model(f"hf:{saved}", role="teacher", num_classes=10, in_channels=1).eval()
    test = load_digits_split("test", 8).renormalized(student.image_mean, student.image_std)
    assert evaluate_classifier(student, test, num_classes=10)["top1"] == pytest.approx(results["student_top1"])


def test_vit_teacher_refused_by_deepinversion_and_accepted_by_dfad(tmp_path, capsys):
    tiny_vit(image_size=16).save_pretrained(tmp_path / "vit")  # needs 16x16: the recipe's 8x8 is resized
    common = ["--teacher", f"hf:{tmp_path / 'vit'}", "--teacher_checkpoint", "none", "--max_steps", "3",
              "--eval_steps", "0", *FAST]
    code = cli.main([str(REPO / "recipes/digits/deepinversion.yaml"), *common, "--output_dir", str(tmp_path / "di"),
                     "--per_device_synthesis_batch_size", "16", "--synthesis_iterations", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "BatchNorm" in err and "dfad" in err and "Traceback" not in err
    assert not (tmp_path / "di" / "results.json").exists()
    code = cli.main([str(REPO / "recipes/digits/dfad.yaml"), *common, "--output_dir", str(tmp_path / "dfad"),
                     "--nz", "16", "--ngf", "8", "--per_device_synthesis_batch_size", "32"])
    assert code == 0
    assert json.loads((tmp_path / "dfad" / "results.json").read_text())["steps"] == 3
