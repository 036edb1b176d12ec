"""The command line as users run it: subprocesses, exit codes, resume, bad input."""

import json
import subprocess

import pytest
from safetensors.torch import load_file

from .conftest import PYTHON, REPO, cli_env

RECIPE = str(REPO / "recipes/digits/dfad.yaml")
FAST = ["--per_device_train_batch_size", "32", "--per_device_synthesis_batch_size", "32", "--nz", "16",
        "--ngf", "8", "--eval_steps", "0", "--logging_steps", "5", "--report_to", "none", "--progress_bar", "false",
        "--lr_scheduler", "constant"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", "accelerate_dfkd", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def students_equal(a, b) -> bool:
    sa, sb = load_file(str(a)), load_file(str(b))
    return sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)


def test_resume_is_bit_identical(tmp_path):
    """Stopped at step 12 and resumed to 24 == run straight to 24 (CPU, same world size),
    with gradient accumulation, so the accumulation counters are restored too."""
    common = [RECIPE, *FAST, "--gradient_accumulation_steps", "2", "--save_steps", "6", "--eval_dataset", "digits"]
    cli(*common, "--max_steps", "24", "--output_dir", str(tmp_path / "straight"))
    cli(*common, "--max_steps", "12", "--output_dir", str(tmp_path / "resumed"))
    cli(*common, "--max_steps", "24", "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest")
    assert students_equal(tmp_path / "straight/student.safetensors", tmp_path / "resumed/student.safetensors")
    a = json.loads((tmp_path / "straight/results.json").read_text())
    b = json.loads((tmp_path / "resumed/results.json").read_text())
    assert a["student_top1"] == b["student_top1"] and b["steps"] == 24 and b["synthesis_rounds"] == 5
    # the generator (per-rank synthesizer state) is identical too
    import torch

    ga = torch.load(tmp_path / "straight/checkpoints/step_000024/rank_0.pt", weights_only=True)
    gb = torch.load(tmp_path / "resumed/checkpoints/step_000024/rank_0.pt", weights_only=True)
    for key, value in ga["synthesizer"]["modules"]["generator"].items():
        assert torch.equal(value, gb["synthesizer"]["modules"]["generator"][key]), key


def test_rotation_keeps_the_newest(tmp_path):
    cli(RECIPE, *FAST, "--max_steps", "8", "--save_steps", "2", "--save_total_limit", "2", "--eval_dataset", "none",
        "--output_dir", str(tmp_path / "r"))
    assert sorted(p.name for p in (tmp_path / "r/checkpoints").iterdir()) == ["step_000006", "step_000008"]


@pytest.mark.parametrize("args, message", [
    (["--max_stepz", "3"], "Did you mean 'max_steps'"),
    (["--image_size", "10"], "image_size=10 cannot be produced"),
    (["--eval_dataset", "mnist", "--data_dir", "/nonexistent"], "MNIST test files not found"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "no complete checkpoint"),
    (["--teacher_checkpoint", "/nonexistent.safetensors"], "does not exist"),
])
def test_bad_input_gets_one_clear_error(tmp_path, args, message):
    proc = cli(RECIPE, "--output_dir", str(tmp_path / "x"), *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_mismatched_teacher_checkpoint(tmp_path):
    import torch
    from safetensors.torch import save_file

    from accelerate_dfkd.models import build_model

    path = tmp_path / "lenet.safetensors"
    save_file(build_model("lenet5", num_classes=10, in_channels=1).state_dict(), str(path))
    proc = cli(RECIPE, "--teacher_checkpoint", str(path), "--output_dir", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr.lower() and "--teacher" in proc.stderr
    assert torch.load is not None and not (tmp_path / "x").exists()
