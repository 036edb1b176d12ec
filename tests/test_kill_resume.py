"""A run killed with SIGKILL at any moment resumes with `--resume_from_checkpoint latest` and
finishes; nothing left in OUTPUT_DIR is corrupt."""

import json
import os
import signal
import subprocess
import time

import torch
from safetensors.torch import load_file

from accelerate_dfkd import checkpointing

from .conftest import PYTHON, REPO, cli_env

ARGS = [str(REPO / "recipes/digits/dfad.yaml"), "--per_device_train_batch_size", "32",
        "--per_device_synthesis_batch_size", "32", "--nz", "16", "--ngf", "8", "--eval_steps", "0",
        "--report_to", "none", "--progress_bar", "false", "--max_steps", "150", "--save_steps", "3",
        "--save_total_limit", "2", "--eval_dataset", "none", "--logging_steps", "1"]


def assert_not_corrupt(out):
    for ckpt in checkpointing.list_checkpoints(out / "checkpoints"):
        json.loads((ckpt / "trainer_state.json").read_text())
        torch.load(ckpt / "rank_0.pt", weights_only=True)
        load_file(str(ckpt / "model.safetensors"))
    for name in ("results.json",):
        if (out / name).exists():
            json.loads((out / name).read_text())


def test_sigkill_at_any_moment_then_resume_latest_finishes(tmp_path):
    out = tmp_path / "run"
    cmd = [PYTHON, "-m", "accelerate_dfkd", *ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    # kill times spread from start-up (before any checkpoint) to mid-run; each resume goes further
    for delay in (1.0, 4.5, 6.0, 7.5):
        proc = subprocess.Popen(cmd, env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert_not_corrupt(out)
    subprocess.run(cmd, env=cli_env(), cwd=REPO, check=True, capture_output=True, timeout=600)
    assert_not_corrupt(out)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 150
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    out = tmp_path / "run"
    subprocess.run([PYTHON, "-m", "accelerate_dfkd", *ARGS, "--max_steps", "6", "--output_dir", str(out)],
                   env=cli_env(), cwd=REPO, check=True, capture_output=True, timeout=600)
    # what a kill in the middle of save_checkpoint leaves behind: a temporary folder without its marker
    stale = out / "checkpoints" / ".tmp-step_000009"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 10)
    assert checkpointing.resolve_resume("latest", out).name == "step_000006"
    subprocess.run([PYTHON, "-m", "accelerate_dfkd", *ARGS, "--max_steps", "9", "--output_dir", str(out),
                    "--resume_from_checkpoint", "latest"], env=cli_env(), cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    assert not stale.exists()
    assert json.loads((out / "results.json").read_text())["steps"] == 9
