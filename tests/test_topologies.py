"""Launch topologies of recipes/accelerate: real 2-rank launches on CPU (gloo) and a check that every
accelerate config file in recipes/accelerate is one `accelerate launch --config_file` accepts.

The 2-node test starts two `accelerate launch --num_machines 2` processes on this machine over
loopback, one rank each; they share OUTPUT_DIR as nodes of a real cluster would share a filesystem.
"""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import PYTHON, REPO, cli_env

pytestmark = pytest.mark.multiprocess

CONFIGS = sorted((REPO / "recipes/accelerate").glob("*.yaml"))
RECIPE = str(REPO / "recipes/digits/dfad.yaml")
FAST = ["--max_steps", "10", "--per_device_train_batch_size", "32", "--per_device_synthesis_batch_size", "32",
        "--nz", "16", "--ngf", "8", "--report_to", "none", "--progress_bar", "false", "--eval_steps", "5",
        "--save_steps", "5"]
TIMEOUT = 300


def wait_all(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Wait for every process within TIMEOUT seconds in all; on timeout kill them all and fail."""
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT)
            outputs.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.communicate()
        pytest.fail(f"launch did not finish within {TIMEOUT} s")
    return outputs


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(),
                            cwd=REPO)


def check_run(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 10
    checkpoints = sorted(p for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    assert checkpoints, f"no checkpoint under {out / 'checkpoints'}"
    assert {p.name for p in checkpoints[-1].glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}


def test_two_nodes_on_loopback(tmp_path):
    out = tmp_path / "x"
    procs = [start([PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                    "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", "29651",
                    "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "accelerate_dfkd", RECIPE, "--output_dir", str(out), *FAST])
             for rank in (0, 1)]
    for rank, (code, text) in enumerate(wait_all(procs)):
        assert code == 0, f"node {rank} exited {code}\n{text[-5000:]}"
    check_run(out)


def test_cpu_2proc_config_file_starts_two_ranks(tmp_path):
    out = tmp_path / "x"
    proc = start([PYTHON, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "recipes/accelerate/cpu_2proc.yaml"), "--main_process_port", "29652",
                  "-m", "accelerate_dfkd", RECIPE, "--output_dir", str(out), *FAST])
    [(code, text)] = wait_all([proc])
    assert code == 0, f"exit {code}\n{text[-5000:]}"
    check_run(out)


def test_expected_config_files_exist():
    names = {p.name for p in CONFIGS}
    assert {"cpu_2proc.yaml", "single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml", "deepspeed_zero2.yaml",
            "fsdp.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_is_accepted_by_accelerate(path):
    """The file parses, has only keys accelerate's ClusterConfig knows (from_yaml_file raises on unknown
    keys), and its distributed_type / dict sections are valid. Reading the file has no side effects."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and "distributed_type" in raw
    assert set(raw) <= set(ClusterConfig.__dataclass_fields__), sorted(set(raw) - set(ClusterConfig.__dataclass_fields__))
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert 0 <= config.machine_rank < config.num_machines
    assert config.mixed_precision in ("no", "fp16", "bf16")
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2
    if config.distributed_type == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP"
    head = path.read_text().split("\ncompute_environment")[0]
    assert "accelerate launch --config_file recipes/accelerate/" + path.name in head.replace("\\\n#", "")


@pytest.mark.slow  # the first DeepSpeed launch JIT-compiles its shm op (about 60 s), cached afterwards
def test_deepspeed_zero2_single_process_on_cpu_trains_saves_and_resumes(tmp_path):
    """DeepSpeed ZeRO-2 for the student where it can run here: one process on CPU (environment.md
    1.3; with two, Accelerate sees world size 1). The run must really go through DeepSpeed (not be
    dropped for cpu=True), write DeepSpeed checkpoints and resume from them."""
    pytest.importorskip("deepspeed", reason="pip install '.[deepspeed]'")
    out = tmp_path / "ds"
    launch = [PYTHON, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
              "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "accelerate_dfkd", RECIPE, "--output_dir", str(out)]
    first = subprocess.run(launch + FAST, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["distributed_type"], results["world_size"], results["steps"]) == ("DEEPSPEED", 1, 10)
    assert (out / "checkpoints/step_000010/pytorch_model").is_dir()  # DeepSpeed's own engine state
    more = [a if a != "10" else "15" for a in FAST] + ["--resume_from_checkpoint", "latest"]
    second = subprocess.run(launch + more, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr + second.stdout
    assert json.loads((out / "results.json").read_text())["steps"] == 15


@pytest.mark.slow  # a DeepSpeed launch (see above)
def test_student_ema_with_zero3_is_refused_before_anything_is_sharded(tmp_path):
    pytest.importorskip("deepspeed", reason="pip install '.[deepspeed]'")
    launch = [PYTHON, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
              "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "accelerate_dfkd", RECIPE, "--output_dir", str(tmp_path / "ds"), "--student_ema_decay", "0.9"]
    proc = subprocess.run(launch + FAST, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600)
    assert proc.returncode != 0
    assert "FSDP and DeepSpeed ZeRO-3 shard them" in proc.stderr
