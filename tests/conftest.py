"""Shared fixtures: tiny but real networks, small configs, one thread per process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from accelerate_dfkd.config import DistillConfig
from accelerate_dfkd.methods.dfad import DFADConfig
from accelerate_dfkd.models import build_model

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The built-in digits teacher is trained once per test session, in a private cache."""
    os.environ.setdefault("ACCELERATE_DFKD_CACHE", str(tmp_path_factory.mktemp("dfkd-cache")))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean state."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def tiny_teacher(seed: int = 0) -> torch.nn.Module:
    """digits_cnn with random weights and non-trivial BatchNorm running statistics."""
    torch.manual_seed(seed)
    model = build_model("digits_cnn", num_classes=10, in_channels=1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval().requires_grad_(False)


def tiny_student(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("digits_cnn_small", num_classes=10, in_channels=1)


def small_configs(tmp_path: Path, **overrides) -> tuple[DistillConfig, DFADConfig]:
    loop = dict(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=16,
                eval_steps=0, save_steps=0, logging_steps=5, report_to="none", progress_bar=False,
                teacher_checkpoint="unused", eval_dataset="none", write_report=False)  # tests/test_report.py
    method = dict(nz=16, ngf=8, per_device_synthesis_batch_size=16)
    for key, value in overrides.items():
        (loop if key in DistillConfig.__dataclass_fields__ else method)[key] = value
    return DistillConfig(**loop), DFADConfig(**method)


def short_digits_run(tmp_path: Path, method: str, method_config, max_steps: int, batch_size: int = 128) -> dict:
    """A short in-process Distiller run on the built-in digits teacher (about 98.9% top-1) into
    digits_cnn_half, evaluated on the held-out digits: the real-data check every method passes."""
    from accelerate_dfkd import Distiller
    from accelerate_dfkd.evaluation import load_digits_split
    from accelerate_dfkd.teachers import load_teacher

    teacher = load_teacher("digits_cnn", "pretrained:digits", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(0)
    student = build_model("digits_cnn_half", 10, in_channels=1)
    config = DistillConfig(method=method, output_dir=str(tmp_path / "run"), max_steps=max_steps, eval_steps=0,
                           save_steps=0, report_to="none", progress_bar=False, write_report=False,
                           teacher_checkpoint="python",
                           eval_dataset="digits", per_device_train_batch_size=batch_size)
    results = Distiller(config, method_config, teacher=teacher, student=student,
                        eval_data=load_digits_split("test")).train()
    assert results["teacher_top1"] > 95
    return results


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


PYTHON = sys.executable
