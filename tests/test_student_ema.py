"""`student_ema_decay`: the run delivers a weight average of the student, and nothing else changes."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from accelerate_dfkd import Distiller
from accelerate_dfkd.config import ConfigError, DistillConfig
from accelerate_dfkd.ema import StudentEMA
from accelerate_dfkd.evaluation import load_digits_split

from .conftest import _reset_accelerate, small_configs, tiny_student, tiny_teacher


def test_update_is_the_warmed_up_exponential_average_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = StudentEMA(model, decay=0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(4):
        model.train()(torch.randn(8, 3))  # moves running stats and num_batches_tracked
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.5, (1 + t) / (10 + t))  # 0.1, 0.18.., 0.25, 0.30..: the warm-up, below 0.5 here
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
        ema.update(model)
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    assert ema.module.state_dict()["1.num_batches_tracked"].item() == 4
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_decay_outside_the_open_interval_is_refused(tmp_path, decay):
    with pytest.raises(ConfigError, match=r"student_ema_decay must be in \(0, 1\)"):
        DistillConfig(output_dir=str(tmp_path), teacher_checkpoint="x", student_ema_decay=decay).validate()
    with pytest.raises(ConfigError, match=r"student_ema_decay must be in \(0, 1\)"):
        StudentEMA(nn.Linear(2, 2), decay)


def test_run_delivers_the_average_and_trains_the_same_online_student(tmp_path):
    eval_data = load_digits_split("test")

    def run(name, **extra):
        _reset_accelerate()
        cfg, method = small_configs(tmp_path / name, max_steps=6, eval_steps=3, eval_dataset="digits", **extra)
        distiller = Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student(), eval_data=eval_data)
        return distiller, distiller.train()

    plain, plain_results = run("plain")
    averaged, results = run("ema", student_ema_decay=0.9)
    # The average only watches: the online student and the generator follow the same trajectory.
    online = averaged.accelerator.unwrap_model(averaged.student).state_dict()
    for k, v in plain.accelerator.unwrap_model(plain.student).state_dict().items():
        assert torch.equal(v, online[k]), f"the EMA changed the online student at {k}"
    assert results["online_student_top1"] == plain_results["student_top1"]
    assert plain_results["online_student_top1"] is None
    # What is scored and saved is the average.
    out = tmp_path / "ema" / "run"
    saved, saved_online = load_file(out / "student.safetensors"), load_file(out / "student_online.safetensors")
    for k, v in averaged.ema.module.state_dict().items():
        assert torch.equal(saved[k], v) and torch.equal(saved_online[k], online[k])
    assert any(not torch.equal(saved[k], saved_online[k]) for k in saved)
    assert averaged.ema.updates == 6
    evals = [row for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval/top1" in row]
    assert [row["eval/top1"] for row in evals] == [v for _, v in results["eval_history"]]
    assert evals[-1]["eval/online_top1"] == results["online_student_top1"]
    assert not (tmp_path / "plain" / "run" / "student_online.safetensors").exists()


def test_resume_restores_the_average_bit_identically(tmp_path):
    def run(out, max_steps, resume=None):
        _reset_accelerate()
        cfg, method = small_configs(tmp_path, output_dir=str(out), max_steps=max_steps, save_steps=4,
                                    student_ema_decay=0.8, resume_from_checkpoint=resume)
        distiller = Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student())
        distiller.train()
        return distiller

    unbroken = run(tmp_path / "a", 8)
    run(tmp_path / "b", 4)
    resumed = run(tmp_path / "b", 8, resume="latest")
    assert resumed.ema.updates == unbroken.ema.updates == 8
    a, b = unbroken.ema.module.state_dict(), resumed.ema.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_decay_is_refused(tmp_path):
    cfg, method = small_configs(tmp_path, max_steps=2, student_ema_decay=0.9)
    Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student()).train()
    _reset_accelerate()
    cfg, method = small_configs(tmp_path, max_steps=4, student_ema_decay=0.99, resume_from_checkpoint="latest")
    with pytest.raises(ConfigError, match="resume with --student_ema_decay 0.9"):
        Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student()).train()


def test_a_half_precision_student_is_averaged_in_float32():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = StudentEMA(model, decay=0.999)
    assert all(v.dtype == torch.float32 for v in ema.module.state_dict().values())
    ema.updates = 10_000  # past the warm-up: each update moves the average by 0.001 of the gap
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight - before, (model.weight.float() - before) * 1e-3, atol=1e-6)


def test_turning_the_average_on_at_a_resume_starts_it_from_the_resumed_student(tmp_path):
    cfg, method = small_configs(tmp_path, max_steps=2)
    Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student()).train()
    _reset_accelerate()
    cfg, method = small_configs(tmp_path, max_steps=4, student_ema_decay=0.9, resume_from_checkpoint="latest")
    distiller = Distiller(cfg, method, teacher=tiny_teacher(), student=tiny_student())
    distiller.train()
    assert distiller.ema.updates == 2  # steps 3 and 4 only
    assert (tmp_path / "run" / "student_online.safetensors").is_file()
