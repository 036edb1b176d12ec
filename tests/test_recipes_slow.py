"""Full recipe runs on real held-out data (slow tier: `make test-all` or `pytest -m slow`)."""

import json
import subprocess

import pytest

from .conftest import PYTHON, REPO, cli_env

pytestmark = pytest.mark.slow


def test_digits_dfad_demo_reaches_90_percent_of_teacher(tmp_path):
    """The demo as `make demo` runs it on a 2-core machine: 2 threads. DFAD's trajectory depends on
    the thread count (reduction order): measured 93.15% with 2 threads but 87.22% with 1 thread
    (teacher 98.89%), see recipes/README.md."""
    out = tmp_path / "demo"
    env = dict(cli_env(), OMP_NUM_THREADS="2")
    subprocess.run([PYTHON, "-m", "accelerate_dfkd", str(REPO / "recipes/digits/dfad.yaml"), "--output_dir", str(out),
                    "--progress_bar", "false", "--num_threads", "2"], env=env, cwd=REPO, check=True, timeout=1800)
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_top1"] >= 95.0
    assert results["student_top1"] >= 0.9 * results["teacher_top1"], results
