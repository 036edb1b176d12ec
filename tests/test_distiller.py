"""The Distiller in-process: outputs, gradient accumulation, a frozen teacher, bad input."""

import json

import pytest
import torch

from accelerate_dfkd import Callback, Distiller
from accelerate_dfkd.config import ConfigError
from accelerate_dfkd.evaluation import load_digits_split

from .conftest import _reset_accelerate, small_configs, tiny_student, tiny_teacher


class EventRecorder(Callback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: object.__getattribute__(self, "events").append(name)
        return object.__getattribute__(self, name)


def test_run_writes_results_student_and_checkpoints(tmp_path):
    cfg, method = small_configs(tmp_path, max_steps=6, save_steps=3, eval_steps=3, eval_dataset="digits")
    recorder = EventRecorder()
    results = Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student(),
                        eval_data=load_digits_split("test"), callbacks=[recorder]).train()
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    for key in ("method", "teacher_top1", "student_top1", "best_student_top1", "steps", "world_size",
                "synthesis_seconds", "distill_seconds"):
        assert key in saved and saved[key] == results[key]
    assert saved["steps"] == 6 and saved["world_size"] == 1 and saved["synthesis_rounds"] == 2
    assert saved["synthesis_seconds"] > 0 and saved["distill_seconds"] > 0
    assert (out / "student.safetensors").is_file() and (out / "best_student.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    assert len(saved["eval_history"]) == 2
    # the robustness metrics (PRE-DFKD): in results.json and, running, in the log
    history = [top1 for _, top1 in saved["eval_history"]]
    assert saved["mean_student_top1"] == pytest.approx(sum(history) / 2)
    assert saved["var_student_top1"] == pytest.approx((history[0] - history[1]) ** 2 / 4)
    evals = [row for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval/top1" in row]
    assert [row["eval/top1"] for row in evals] == history
    assert evals[-1]["eval/best_top1"] == max(history) == saved["best_student_top1"]
    assert evals[-1]["eval/mean_top1"] == pytest.approx(saved["mean_student_top1"])
    assert evals[-1]["eval/var_top1"] == pytest.approx(saved["var_student_top1"])
    # the documented event order
    ev = recorder.events
    assert ev[0] == "on_train_start" and ev[-1] == "on_train_end"
    assert ev[1:6] == ["on_synthesis_start", "on_synthesis_end", "on_step_start", "on_step_end", "on_step_start"]
    assert ev.index("on_evaluate") < ev.index("on_save")
    assert ev.count("on_synthesis_start") == 2 and ev.count("on_step_end") == 6


def test_teacher_never_changes(tmp_path):
    teacher = tiny_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg, method = small_configs(tmp_path, max_steps=10, student_steps_per_round=1)
    Distiller(cfg, method, teacher=teacher, student=tiny_student()).train()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_gradient_accumulation_still_updates_the_generator(tmp_path):
    """With 2 micro-batches per optimizer step, every round still takes its generator step."""
    cfg, method = small_configs(tmp_path, max_steps=4, gradient_accumulation_steps=2, student_steps_per_round=1)
    snapshots = []

    class Watch(Callback):
        def on_synthesis_end(self, state, output):
            snapshots.append([p.detach().clone() for p in distiller.synthesizer.generator.parameters()])

    student = tiny_student()
    student_before = [p.detach().clone() for p in student.parameters()]
    distiller = Distiller(cfg, method, teacher=tiny_teacher(), student=student, callbacks=[Watch()])
    distiller.train()
    assert len(snapshots) == 4
    for a, b in zip(snapshots, snapshots[1:]):
        assert any(not torch.equal(x, y) for x, y in zip(a, b)), "a round did not update the generator"
    adam_steps = [s["step"] for s in distiller.synthesizer.optimizer.state_dict()["state"].values()]
    assert all(int(s) == 4 for s in adam_steps)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))


def test_lr_schedule_multistep_reaches_generator_too(tmp_path):
    cfg, method = small_configs(tmp_path, max_steps=4, lr_scheduler="multistep", lr_milestones=[2],
                                student_steps_per_round=1)
    distiller = Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student())
    distiller.train()
    assert distiller.scheduler.get_last_lr()[0] == pytest.approx(cfg.learning_rate * 0.1)
    assert distiller.synthesizer.optimizer.param_groups[0]["lr"] == pytest.approx(method.generator_lr * 0.1)


def test_wrong_logits_shape_is_refused(tmp_path):
    cfg, method = small_configs(tmp_path, num_classes=7)
    with pytest.raises(ConfigError, match=r"outputs shape \(2, 10\).*\(2, 7\)"):
        Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student())


def test_existing_run_is_not_overwritten(tmp_path):
    cfg, method = small_configs(tmp_path, max_steps=2)
    Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student()).train()
    results = (tmp_path / "run" / "results.json").read_bytes()
    _reset_accelerate()
    with pytest.raises(ConfigError, match="already holds a run"):
        Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student()).train()
    assert (tmp_path / "run" / "results.json").read_bytes() == results
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "trainer_state.json").is_file()


def test_resume_pointing_at_nothing_is_an_error(tmp_path):
    cfg, method = small_configs(tmp_path, resume_from_checkpoint=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student()).train()
    assert not (tmp_path / "run").exists()


def test_bf16_smoke_and_trackers_and_image_grid(tmp_path):
    """bf16 autocast runs on CPU (slowly: two steps only); tensorboard and PNG grids are written."""
    cfg, method = small_configs(tmp_path, max_steps=2, mixed_precision="bf16", report_to="tensorboard",
                                image_grid_rounds=1, student_steps_per_round=1)
    results = Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student()).train()
    assert results["steps"] == 2
    out = tmp_path / "run"
    assert list(out.rglob("events.out.tfevents*")), "no tensorboard event file"
    grid = out / "images" / "round_000001.png"
    from PIL import Image

    with Image.open(grid) as image:
        image.load()
        assert image.mode == "L" and image.size[0] > 8


def test_fp16_on_cpu_warns(tmp_path):
    cfg, method = small_configs(tmp_path, max_steps=1, mixed_precision="fp16")
    with pytest.warns(UserWarning, match="fp16 has no effect on CPU"):
        Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student())


def test_segmentation_pair_distils_with_dense_l1(tmp_path):
    """DFAD on dense outputs: the student loss is L1 over every pixel's logits and the generator
    maximises -log(1 + L1) (task=segmentation)."""

    class TinySeg(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                            torch.nn.ReLU(), torch.nn.Conv2d(width, 3, 1))

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    teacher = TinySeg(8).eval().requires_grad_(False)
    cfg, method = small_configs(tmp_path, max_steps=4, task="segmentation", num_classes=3,
                                student_steps_per_round=2, logging_steps=1)
    results = Distiller(cfg, method, teacher=teacher, student=TinySeg(4)).train()
    # no eval set: no score, and the keys name the dense metric, never top-1
    assert results["steps"] == 4 and results["metric"] == "miou" and results["student_miou"] is None
    assert not any(key.endswith("_top1") for key in results)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(-1.0 < row["synthesis/adversarial"] <= 0 for row in log if "synthesis/adversarial" in row)


def test_channels_last_runs_the_same_training_and_saves_plain_checkpoints(tmp_path):
    """channels_last is a memory layout, not a different computation: the same student up to float
    rounding, generator weights really in channels_last, and checkpoints that resume."""
    students = {}
    for layout in (False, True):
        _reset_accelerate()
        cfg, method = small_configs(tmp_path / str(layout), max_steps=6, save_steps=3, channels_last=layout)
        distiller = Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student())
        distiller.train()
        conv = next(m for m in distiller.synthesizer.generator.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == layout
        students[layout] = distiller.student.state_dict()
    for key, value in students[False].items():
        assert torch.allclose(value.float(), students[True][key].float(), atol=1e-4), key
    _reset_accelerate()
    cfg, method = small_configs(tmp_path / "True", max_steps=9, channels_last=True,
                                resume_from_checkpoint="latest")
    assert Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student()).train()["steps"] == 9
