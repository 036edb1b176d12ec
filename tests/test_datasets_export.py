"""Export of synthetic sets to `datasets` (disk and parquet), reading them back as a source, KD on an
export with the Distiller, and the `accelerate-dfkd synthesize` command run as users run it."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import save_file

from accelerate_dfkd import Distiller, DistillConfig
from accelerate_dfkd.cli import main as cli_main
from accelerate_dfkd.config import ConfigError
from accelerate_dfkd.integrations.datasets_io import (DatasetSource, dequantize_images, export_synthetic_dataset,
                                                      load_synthetic_dataset, quantize_images, synthesize_command)
from accelerate_dfkd.integrations.trainer import build_synthesizer
from accelerate_dfkd.methods.dfad import DFADConfig
from accelerate_dfkd.methods.exported_dataset import ExportedDatasetConfig
from accelerate_dfkd.models import build_model
from accelerate_dfkd.teachers import load_teacher

from .conftest import PYTHON, REPO, cli_env, tiny_student, tiny_teacher

pytest.importorskip("datasets")

SHAPE = (1, 8, 8)


def tiny_dfad(seed: int = 0, **overrides):
    cfg = dict(nz=16, ngf=8, per_device_synthesis_batch_size=32)
    cfg.update(overrides)
    return build_synthesizer("dfad", tiny_teacher(), image_shape=SHAPE, num_classes=10, seed=seed, **cfg)


def test_quantization_error_is_within_half_a_step():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 8, 8) * 2 + 1
    images[3] = 0.5  # a constant image encodes as zeros and decodes exactly
    codes, low, high = quantize_images(images)
    assert codes.dtype.name == "uint8" and codes.shape == (16, 3, 8, 8)
    assert codes.reshape(16, -1).max(1).tolist()[0] == 255 and codes.reshape(16, -1).min(1).tolist()[0] == 0
    back = dequantize_images(codes, low, high)
    step = torch.from_numpy(high - low).view(-1, 1, 1, 1) / 255
    assert ((back - images).abs() <= step / 2 + 1e-5).all()
    assert torch.equal(back[3], images[3])


def test_disk_export_keeps_the_images_in_order_and_the_teacher_outputs(tmp_path):
    """100 images drawn in batches of 32 (the last one trimmed): the export holds exactly the source's
    first 100 images up to quantisation, with the teacher's logits on the exported images."""
    synth = tiny_dfad()
    record = export_synthetic_dataset(synth, tiny_student(), tmp_path / "synth", num_images=100, batch_size=32)
    assert record["mode"] == "source" and record["num_images"] == 100
    dataset, loaded = load_synthetic_dataset(tmp_path / "synth")
    assert loaded == record and len(dataset) == 100
    assert set(dataset.column_names) == {"image", "image_low", "image_high", "teacher_logits", "teacher_label"}
    rows = dataset.with_format("numpy")[:]
    images = dequantize_images(rows["image"], rows["image_low"], rows["image_high"])

    source = tiny_dfad().build_source(32)  # the same seed: the same generator and latent stream
    expected = torch.cat([source.next_batch().images for _ in range(4)])[:100]
    step = torch.from_numpy(rows["image_high"] - rows["image_low"]).view(-1, 1, 1, 1) / 255
    assert ((images - expected).abs() <= step / 2 + 1e-5).all()
    logits = torch.from_numpy(rows["teacher_logits"])
    assert torch.allclose(logits, synth.teacher(expected), atol=1e-4)
    assert torch.equal(torch.from_numpy(rows["teacher_label"]), logits.argmax(1))
    assert not list(tmp_path.glob(".synth*")), "temporary cache or staging folders were left behind"


def test_parquet_export_with_top_k_probabilities(tmp_path):
    path = tmp_path / "synth.parquet"
    export_synthetic_dataset(tiny_dfad(), tiny_student(), path, num_images=40, batch_size=32, format="parquet",
                             teacher_outputs="topk", top_k=3, synthesize_every=1)
    dataset, record = load_synthetic_dataset(path)
    assert record["teacher_outputs"] == "topk" and record["top_k"] == 3 and len(dataset) == 40
    rows = dataset.with_format("torch")[:]
    probs, indices = rows["teacher_topk_probs"], rows["teacher_topk_indices"]
    assert probs.shape == (40, 3) and (probs[:, :-1] >= probs[:, 1:]).all() and (probs.sum(1) <= 1 + 1e-5).all()
    assert torch.equal(indices[:, 0], rows["teacher_label"])
    assert dataset.features["image"].shape == SHAPE
    # the file is plain parquet with `datasets` features: the library's own reader agrees
    from datasets import Dataset

    official = Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf-cache"))
    assert official.features == dataset.features and official["teacher_label"] == dataset["teacher_label"]


def test_export_refuses_to_overwrite_and_bad_paths(tmp_path):
    export_synthetic_dataset(tiny_dfad(), None, tmp_path / "a", num_images=8, batch_size=8)
    with pytest.raises(ConfigError, match="exists"):
        export_synthetic_dataset(tiny_dfad(), None, tmp_path / "a", num_images=8, batch_size=8)
    export_synthetic_dataset(tiny_dfad(), None, tmp_path / "a", num_images=16, batch_size=8, overwrite=True)
    assert len(load_synthetic_dataset(tmp_path / "a")[0]) == 16
    with pytest.raises(ConfigError, match="no synthetic dataset"):
        load_synthetic_dataset(tmp_path / "missing")
    with pytest.raises(ConfigError, match="top_k"):
        export_synthetic_dataset(tiny_dfad(), None, tmp_path / "b", num_images=8, teacher_outputs="topk", top_k=11)


def test_rounds_mode_exports_what_each_synthesis_round_makes(tmp_path):
    """DeepInversion's source re-reads its pool with replacement; its export takes each round's images."""
    synth = build_synthesizer("deepinversion", tiny_teacher(), image_shape=SHAPE, num_classes=10,
                              per_device_synthesis_batch_size=8, synthesis_iterations=2, adversarial_weight=0.0)
    record = export_synthetic_dataset(synth, tiny_student(), tmp_path / "di", num_images=20, batch_size=8)
    assert record["mode"] == "rounds" and synth.rounds == 3 and len(synth.pool) == 24
    rows = load_synthetic_dataset(tmp_path / "di")[0].with_format("torch")[:]
    pool = synth.pool.images[:20].float()
    images = dequantize_images(rows["image"].numpy(), rows["image_low"].numpy(), rows["image_high"].numpy())
    assert torch.allclose(images, pool, atol=0.05)  # float16 pool vs uint8 export of the same images
    # DeepInversion aims each image at a class (its cross-entropy target, sorted per round).
    aimed = rows["aimed_class"]
    assert aimed.dtype == torch.int64 and aimed.shape == (20,) and 0 <= aimed.min() and aimed.max() < 10
    for start in (0, 8):
        assert torch.equal(aimed[start:start + 8], aimed[start:start + 8].sort().values)
    batch = DatasetSource(tmp_path / "di", 20, torch.Generator().manual_seed(0), shuffle=False).next_batch()
    assert torch.equal(batch.targets.cpu(), aimed)


def test_dataset_source_reads_every_image_once_per_epoch_and_resumes(tmp_path):
    export_synthetic_dataset(tiny_dfad(), None, tmp_path / "s.parquet", num_images=64, batch_size=32,
                             format="parquet")
    source = DatasetSource(tmp_path / "s.parquet", 16, torch.Generator().manual_seed(0))
    epoch = torch.cat([source.next_batch().images for _ in range(4)])
    assert epoch.shape == (64, *SHAPE) and epoch.dtype == torch.float32
    rows = load_synthetic_dataset(tmp_path / "s.parquet")[0].with_format("numpy")[:]
    every = dequantize_images(rows["image"], rows["image_low"], rows["image_high"])
    key = lambda t: sorted(t.flatten(1).sum(1).tolist())  # noqa: E731
    assert key(epoch) == pytest.approx(key(every))  # a permutation of all 64, none repeated
    state = source.state_dict()
    following = source.next_batch().images
    resumed = DatasetSource(tmp_path / "s.parquet", 16, torch.Generator().manual_seed(123))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch().images, following)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        DatasetSource(tmp_path / "s.parquet", 65, torch.Generator())


def test_distiller_runs_kd_on_an_exported_set(tmp_path):
    export_synthetic_dataset(tiny_dfad(), None, tmp_path / "synth", num_images=64, batch_size=32)
    teacher, student = tiny_teacher(), tiny_student()
    config = DistillConfig(method="exported_dataset", output_dir=str(tmp_path / "run"), max_steps=6,
                           per_device_train_batch_size=16, eval_steps=0, save_steps=0, report_to="none",
                           progress_bar=False, teacher_checkpoint="python", eval_dataset="none")
    before = [p.clone() for p in student.parameters()]
    results = Distiller(config, ExportedDatasetConfig(dataset_path=str(tmp_path / "synth")), teacher=teacher,
                        student=student).train()
    assert results["steps"] == 6
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(ConfigError, match="image"):
        config.output_dir, config.image_size = str(tmp_path / "run2"), 16
        Distiller(config, ExportedDatasetConfig(dataset_path=str(tmp_path / "synth")), teacher=teacher,
                  student=tiny_student())


def _teacher_file(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_teacher().state_dict().items()}, str(path))
    return str(path)


SMALL = ["--nz", "16", "--ngf", "8", "--per_device_train_batch_size", "32", "--per_device_synthesis_batch_size", "32"]


def test_synthesize_cli_writes_a_dataset(tmp_path):
    """As users run it: `accelerate-dfkd synthesize RECIPE --num_images N --output PATH --format parquet`."""
    out = tmp_path / "digits.parquet"
    cmd = [PYTHON, "-m", "accelerate_dfkd", "synthesize", "recipes/digits/dfad.yaml", "--num_images", "50",
           "--output", str(out), "--format", "parquet", "--teacher_checkpoint", _teacher_file(tmp_path), *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "synthesize: 50 images of method dfad" in proc.stdout
    dataset, record = load_synthetic_dataset(out)
    assert len(dataset) == 50 and record["recipe"] == "recipes/digits/dfad.yaml" and record["synthesize_every"] == 1


def test_synthesize_cli_errors_name_the_fix(tmp_path, capsys):
    base = ["synthesize", "recipes/digits/dfad.yaml", "--num_images", "8"]
    assert cli_main(base + ["--output", str(tmp_path / "x"), "--formatt", "disk"]) == 2
    assert "Did you mean 'format'" in capsys.readouterr().err
    assert cli_main(base) == 2
    assert "needs --output PATH" in capsys.readouterr().err
    assert cli_main(base + ["--output", str(tmp_path / "x"), "--format", "parquet"]) == 2
    assert ".parquet path" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert cli_main(base + ["--output", str(tmp_path / "taken")]) == 2
    assert "--overwrite true" in capsys.readouterr().err


def test_synthesize_from_a_distillation_checkpoint(tmp_path):
    """--from_checkpoint restores the run's generator and student: the export is the trained
    generator's output, not a fresh one's."""
    teacher_path = _teacher_file(tmp_path)
    run_dir = tmp_path / "run"
    config = DistillConfig(method="dfad", output_dir=str(run_dir), max_steps=10, per_device_train_batch_size=32,
                           eval_steps=0, save_steps=0, report_to="none", progress_bar=False,
                           teacher_checkpoint=teacher_path, eval_dataset="none", student="digits_cnn_half")
    synth_cfg = dict(nz=16, ngf=8, per_device_synthesis_batch_size=32, generator_lr=0.05)
    teacher = load_teacher("digits_cnn", teacher_path, num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(0)
    distiller = Distiller(config, DFADConfig(**synth_cfg), teacher=teacher,
                          student=build_model("digits_cnn_half", 10, in_channels=1))
    distiller.train()
    trained_generator = distiller.synthesizer.generator

    overrides = {"teacher_checkpoint": teacher_path, "student": "digits_cnn_half", "output_dir": str(run_dir),
                 "num_images": "32", **{k.lstrip("-"): v for k, v in zip(SMALL[::2], SMALL[1::2])},
                 "generator_lr": "0.05"}
    with pytest.raises(ConfigError, match="output"):
        synthesize_command("recipes/digits/dfad.yaml", dict(overrides, from_checkpoint="latest"))
    record = synthesize_command("recipes/digits/dfad.yaml", dict(overrides, from_checkpoint="latest",
                                                                   output=str(tmp_path / "x")))
    assert record["from_checkpoint"].endswith("step_000010") and record["synthesize_every"] == 0
    rows = load_synthetic_dataset(tmp_path / "x")[0].with_format("numpy")[:]
    images = dequantize_images(rows["image"], rows["image_low"], rows["image_high"])
    # the same generator weights and the same random stream as the source of a restored synthesizer
    restored = tiny_dfad(**synth_cfg)
    restored.generator.load_state_dict(trained_generator.state_dict())
    assert torch.allclose(images, restored.build_source(32).next_batch().images, atol=0.05)
    fresh = tiny_dfad(**synth_cfg).build_source(32).next_batch().images
    assert not torch.allclose(images, fresh, atol=0.05)
