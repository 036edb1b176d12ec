"""Real 2-process launches on CPU (gloo): `accelerate launch --multi_gpu` and torchrun.

On a machine without CUDA, `accelerate launch --cpu --num_processes 2` starts one process, and
torchrun ranks with a plain Accelerator() silently run alone (environment.md section 2): these
tests check that the library really forms one world of 2 ranks.
"""

import json
import subprocess

import pytest
import torch

from .conftest import PYTHON, REPO, cli_env

pytestmark = pytest.mark.multiprocess

LAUNCH = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
FAST = ["--per_device_train_batch_size", "32", "--per_device_synthesis_batch_size", "32", "--nz", "16", "--ngf", "8",
        "--report_to", "none", "--progress_bar", "false", "--eval_steps", "10"]


def run(cmd, port):
    env = cli_env()
    env["MASTER_PORT"] = str(port)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_ranks_synthesize_different_images_and_end_with_identical_students(tmp_path):
    run([*LAUNCH, "--main_process_port", "29611", str(REPO / "tests/scripts/ddp_probe.py"), str(tmp_path)], 29611)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["live_ddp"] == r1["live_ddp"] == 0 and not (r0["process_group_alive"] or r1["process_group_alive"])
    assert not torch.allclose(r0["synthesis"], r1["synthesis"]), "ranks synthesized the same images"
    assert not torch.allclose(r0["batch"], r1["batch"]), "ranks drew the same student batch"
    for key in r0["student"]:
        assert torch.equal(r0["student"][key], r1["student"][key]), f"students differ at {key}"
    for key in r0["generator"]:
        assert torch.equal(r0["generator"][key], r1["generator"][key]), f"generators differ at {key}"
    assert {p.name for p in (tmp_path / "run/checkpoints/step_000006").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}


def test_accelerate_launch_cli_writes_world_size_2(tmp_path):
    out = tmp_path / "x"
    run([*LAUNCH, "--main_process_port", "29612", "-m", "accelerate_dfkd", str(REPO / "recipes/digits/dfad.yaml"),
         "--max_steps", "20", "--output_dir", str(out), *FAST], 29612)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 20 and results["student_top1"] is not None


def test_torchrun_cli_writes_world_size_2_and_resumes(tmp_path):
    out = tmp_path / "x"
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
                "-m", "accelerate_dfkd", str(REPO / "recipes/digits/dfad.yaml"), "--output_dir", str(out), *FAST,
                "--student_ema_decay", "0.9"]
    run([*torchrun, "--max_steps", "10", "--save_steps", "5"], 29613)
    resumed = run([*torchrun, "--max_steps", "20", "--resume_from_checkpoint", "latest"], 29613)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 20
    assert "no student EMA" not in resumed.stderr + resumed.stdout
    # the student's weight average (its BatchNorm statistics averaged over ranks) crossed the resume
    assert results["online_student_top1"] is not None and results["config"]["student_ema_decay"] == 0.9
