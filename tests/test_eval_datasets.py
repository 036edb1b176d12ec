"""Evaluation sets read through `datasets` (image folders, CIFAR-10 JPEG) and the evaluation metrics:
torchmetrics top-1/top-5, user metrics (torchmetrics objects, `evaluate` modules), synced across ranks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from accelerate_dfkd import cli
from accelerate_dfkd.evaluation import (DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD, DataError,
                                        EvaluateMetric, LabeledImages, evaluate_classifier, evaluate_top1,
                                        load_digits_split, load_eval_set)

from .conftest import PYTHON, REPO, cli_env, small_configs, tiny_student

pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

DATA_DIR = Path(os.environ.get("DFKD_DATA_DIR", REPO.parent / "shared" / "data"))
COLOURS = {"dog": (200, 40, 10), "ant": (0, 128, 255), "cat": (90, 90, 90)}  # classes sort as ant, cat, dog


def make_imagefolder(root: Path) -> Path:
    """root/test/<class>/*.png (solid colours, assorted sizes) and a decoy root/train/ split."""
    for split, count in (("test", 3), ("train", 2)):
        for cls, colour in COLOURS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                colour_here = colour if split == "test" else (255, 255, 255)
                Image.new("RGB", (10 + i, 12), colour_here).save(root / split / cls / f"{i}.png")
    (root / "test" / "README.txt").write_text("not an image, not a class folder")
    return root


# --- image folders ----------------------------------------------------------------------------------
def test_imagefolder_reads_the_test_split_resized_and_normalised(tmp_path):
    root = make_imagefolder(tmp_path / "folder")
    data = load_eval_set(f"imagefolder:{root}", image_size=8, in_channels=3)
    assert data.images.shape == (9, 3, 8, 8) and data.images.dtype == torch.float32
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD  # the default for 3 channels
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for image, label in zip(data.images, data.labels):
        colour = COLOURS[["ant", "cat", "dog"][int(label)]]  # solid colours survive resizing exactly
        expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
        assert torch.allclose(image, expected.expand(3, 8, 8), atol=1e-5)
    # the teacher's normalisation, one channel: PIL's L conversion, then (p - 0.5) / 0.5
    gray = load_eval_set(f"imagefolder:{root}", image_size=4, in_channels=1, mean=[0.5], std=[0.5])
    assert gray.images.shape == (9, 1, 4, 4)
    for image, label in zip(gray.images, gray.labels):
        colour = COLOURS[["ant", "cat", "dog"][int(label)]]
        luminance = Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0)) / 255
        assert torch.allclose(image, torch.full((1, 4, 4), (luminance - 0.5) / 0.5), atol=1e-5)


def test_subsets_and_renormalisation(tmp_path):
    root = make_imagefolder(tmp_path / "folder")
    sub = load_eval_set(f"imagefolder:{root}", image_size=8, max_samples=4)
    again = load_eval_set(f"imagefolder:{root}", image_size=8, max_samples=4)
    assert len(sub) == 4 and torch.equal(sub.images, again.images) and torch.equal(sub.labels, again.labels)
    digits = load_digits_split("test", 8)
    assert digits.mean == (DIGITS_MEAN,) and len(load_eval_set("digits", 8, max_samples=100)) == 100
    moved = digits.renormalized([0.5], [0.25])
    assert torch.allclose(moved.images, ((digits.images * DIGITS_STD + DIGITS_MEAN) - 0.5) / 0.25, atol=1e-6)
    assert torch.allclose(moved.renormalized((DIGITS_MEAN,), (DIGITS_STD,)).images, digits.images, atol=1e-5)
    assert torch.equal(load_eval_set("digits", 8, mean=[0.5], std=[0.25]).images, moved.images)
    unknown = LabeledImages(digits.images, digits.labels, "mine")
    with pytest.raises(DataError, match="unknown normalisation"):
        unknown.renormalized([0.5], [0.5])


@pytest.mark.parametrize("name, message", [
    ("imagefolder:/nonexistent/folder", "does not exist"),
    ("imagefolder:{empty}", "no images found"),
    ("cifar10_jpeg", "cifar10_jpeg_test.tar.gz not found"),
    ("cifar100", "unknown eval_dataset 'cifar100'"),
])
def test_bad_eval_sets_get_one_clear_error(tmp_path, name, message):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=message):
        load_eval_set(name.format(empty=tmp_path / "empty"), 32, data_dir=str(tmp_path / "nodata"))


def test_cli_evaluates_on_an_imagefolder(tmp_path):
    """--eval_dataset imagefolder:<path> through the CLI's main (a random 3-class, 3-channel teacher, 2 steps)."""
    from safetensors.torch import save_file

    from accelerate_dfkd.models import build_model

    torch.manual_seed(0)
    teacher = build_model("digits_cnn", num_classes=3, in_channels=3)
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    root = make_imagefolder(tmp_path / "folder")
    out = tmp_path / "run"
    code = cli.main([str(REPO / "recipes/digits/dfad.yaml"), "--eval_dataset", f"imagefolder:{root}", "--in_channels",
                     "3", "--num_classes", "3", "--teacher", "digits_cnn", "--teacher_checkpoint",
                     str(tmp_path / "teacher.safetensors"), "--student", "digits_cnn_small", "--max_steps", "2",
                     "--eval_steps", "0", "--nz", "8", "--ngf", "8", "--per_device_train_batch_size", "8",
                     "--per_device_synthesis_batch_size", "8", "--report_to", "none", "--progress_bar", "false",
                     "--image_grid_rounds", "0", "--output_dir", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["teacher_scores"]) == {"top1"}  # 3 classes: no top-5
    assert 0 <= results["teacher_top1"] <= 100


def test_cli_normalisation_keys(tmp_path, capsys):
    """--image_mean without --image_std is refused before anything runs; with both, the eval set is
    normalised with them (here: a digits run whose held-out set is moved to mean 0.5, std 0.5)."""
    recipe = str(REPO / "recipes/digits/dfad.yaml")
    assert cli.main([recipe, "--image_mean", "[0.5]", "--output_dir", str(tmp_path / "x")]) == 2
    assert "image_mean and image_std go together" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    from accelerate_dfkd.config import load_recipe

    config, _ = load_recipe(recipe, {"image_mean": "[0.5]", "image_std": "[0.25]"})
    assert config.image_mean == [0.5] and config.image_std == [0.25]
    moved = load_eval_set(config.eval_dataset, 8, mean=config.image_mean, std=config.image_std)
    assert moved.mean == (0.5,) and moved.std == (0.25,)


@pytest.mark.slow  # about 12 s: the archive is extracted (10,000 files) into each test session's fresh cache
@pytest.mark.skipif(not (DATA_DIR / "cifar10-jpeg" / "cifar10_jpeg_test.tar.gz").is_file()
                    or not (DATA_DIR / "teachers/cifar10-resnet-akamaster/resnet56-4bfd9763.th").is_file(),
                    reason="shared CIFAR-10 JPEG data or the akamaster ResNet-56 absent (set DFKD_DATA_DIR)")
def test_akamaster_resnet56_scores_on_cifar10_jpeg():
    """The shared README: 83.2% on the whole JPEG test set (93.4% on the lossless one). A fixed
    300-image subset, ImageNet normalisation (the akamaster convention, the folder default)."""
    from accelerate_dfkd.teachers import load_teacher

    data = load_eval_set("cifar10_jpeg", 32, data_dir=str(DATA_DIR), in_channels=3, max_samples=300)
    assert len(data) == 300 and data.labels.bincount().min() > 15  # a random subset covers every class
    teacher = load_teacher("resnet56", str(DATA_DIR / "teachers/cifar10-resnet-akamaster/resnet56-4bfd9763.th"),
                           num_classes=10, in_channels=3, image_size=32)
    scores = evaluate_classifier(teacher, data, num_classes=10)
    assert 75 < scores["top1"] < 90 and scores["top5"] > 97
    # un-normalised [0, 1] pixels: the normalisation on this path is what the teacher needs
    wrong = data.subset(100).renormalized((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert evaluate_classifier(teacher, wrong, num_classes=10)["top1"] < scores["top1"] - 10


# --- metrics ------------------------------------------------------------------------------------------
class FixedLogits(nn.Module):
    """A real (linear) classifier whose logits on `images` are known: images are one-hot indices."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Linear(logits.shape[0], logits.shape[1], bias=False)
        self.table.weight.data = logits.t().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x.flatten(1))


def fixed_problem(n: int = 50, classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    images = torch.eye(n).view(n, 1, 1, n)  # image i picks row i of the table
    return FixedLogits(logits), LabeledImages(images, labels, "fixed"), logits, labels


def test_top1_and_top5_match_a_direct_count():
    model, data, logits, labels = fixed_problem()
    top5 = logits.topk(5, dim=1).indices
    expected1 = 100 * (logits.argmax(1) == labels).float().mean().item()
    expected5 = 100 * (top5 == labels[:, None]).any(1).float().mean().item()
    for batch_size in (7, 64):  # uneven batches give the same counts
        scores = evaluate_classifier(model, data, num_classes=10, batch_size=batch_size)
        assert scores == pytest.approx({"top1": expected1, "top5": expected5})
    assert expected1 < expected5 < 100  # the fixed problem tells the two apart
    assert evaluate_top1(model, data, num_classes=10) == pytest.approx(expected1)  # the top-1-only shortcut
    # per-rank slices (rank::world) cover the set exactly once
    assert sum(len(data.labels[r::3]) for r in range(3)) == len(data)
    few = fixed_problem(classes=4)
    assert set(evaluate_classifier(few[0], few[1], num_classes=4)) == {"top1"}  # no top-5 below 5 classes


def test_user_metrics_torchmetrics_and_plain_objects():
    from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score

    model, data, logits, labels = fixed_problem()
    scores = evaluate_classifier(model, data, num_classes=10, metrics={
        "f1": MulticlassF1Score(num_classes=10, average="macro"),
        "per_class_f1": MulticlassF1Score(num_classes=10, average=None)})
    reference = MulticlassF1Score(num_classes=10, average="macro")(logits, labels)
    assert scores["f1"] == pytest.approx(float(reference))
    assert {f"per_class_f1/{i}" for i in range(10)} <= set(scores)
    # a second call starts from zero (metrics are reset, not accumulated across evaluations)
    assert evaluate_classifier(model, data, num_classes=10, metrics={"f1": MulticlassF1Score(10)})["f1"] == \
        pytest.approx(float(MulticlassF1Score(10)(logits, labels)))
    with pytest.raises(ValueError, match="taken by the built-in"):
        evaluate_classifier(model, data, num_classes=10, metrics={"top1": MulticlassConfusionMatrix(10)})
    with pytest.raises(TypeError, match=r"needs update\(logits, labels\)"):
        evaluate_classifier(model, data, num_classes=10, metrics={"bad": object()})


ACCURACY_SCRIPT = '''
"""Accuracy as a local `evaluate` metric script (evaluate.load of a name needs the Hub)."""
import datasets
import evaluate


class LocalAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="fraction of correct predictions", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Value("int64"),
                                                               "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, scale=1.0):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": scale * correct / len(references), "count": len(references)}
'''


def write_accuracy_script(folder: Path) -> Path:
    path = folder / "local_accuracy" / "local_accuracy.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(ACCURACY_SCRIPT))
    return path


def test_an_evaluate_module_is_accepted(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    model, data, logits, labels = fixed_problem()
    module = evaluate.load(str(write_accuracy_script(tmp_path)), cache_dir=str(tmp_path / "cache"))
    scores = evaluate_classifier(model, data, num_classes=10, batch_size=16, metrics={
        "acc": module, "acc_percent": EvaluateMetric(module, scale=100.0)})
    assert scores["acc/accuracy"] == pytest.approx(scores["top1"] / 100)
    assert scores["acc/count"] == len(data)
    assert scores["acc_percent/accuracy"] == pytest.approx(scores["top1"])


def test_distiller_logs_top5_and_user_metrics(tmp_path):
    from torchmetrics.classification import MulticlassF1Score

    from accelerate_dfkd import Distiller

    from .conftest import tiny_teacher

    config, method = small_configs(tmp_path, max_steps=4, eval_steps=2)
    results = Distiller(config, method, teacher=tiny_teacher(), student=tiny_student(),
                        eval_data=load_digits_split("test"),
                        eval_metrics={"f1": MulticlassF1Score(num_classes=10, average="macro")}).train()
    logged = [json.loads(line) for line in (Path(config.output_dir) / "log.jsonl").read_text().splitlines()]
    evals = [entry for entry in logged if "eval/top1" in entry]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(e["eval/top5"] >= e["eval/top1"] and 0 <= e["eval/f1"] <= 1 for e in evals)
    assert results["student_scores"]["top1"] == results["student_top1"] == evals[-1]["eval/top1"]
    assert set(results["teacher_scores"]) == {"top1", "top5", "f1"}


@pytest.mark.multiprocess
def test_metrics_agree_across_two_ranks(tmp_path):
    """torchrun, 2 gloo ranks, each scoring its slice: the same top-1/top-5/F1 (and evaluate
    accuracy) on both ranks as in one process."""
    from torchmetrics.classification import MulticlassF1Score

    script = write_accuracy_script(tmp_path)
    env = cli_env()
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29721",
                           str(REPO / "tests/scripts/eval_metrics_probe.py"), str(tmp_path), str(script)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    ranks = [json.loads((tmp_path / f"scores_rank{r}.json").read_text()) for r in (0, 1)]
    model, data, _, _ = fixed_problem(n=101)  # odd: uneven shards
    single = evaluate_classifier(model, data, num_classes=10,
                                 metrics={"f1": MulticlassF1Score(num_classes=10, average="macro")})
    for scores in ranks:
        assert scores["world_size"] == 2 and scores["slice"] in (50, 51)
        for key in ("top1", "top5", "f1"):
            assert scores[key] == pytest.approx(single[key]), key
        if importlib.util.find_spec("evaluate") is not None:  # EvaluateMetric gathered both ranks' predictions
            assert scores["acc/accuracy"] == pytest.approx(single["top1"] / 100)
            assert scores["acc/count"] == 101
