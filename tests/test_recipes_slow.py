"""Full recipe runs on real held-out data (slow tier: `make test-all` or `pytest -m slow`)."""

import json
import subprocess

import pytest

from .conftest import PYTHON, REPO, cli_env

pytestmark = pytest.mark.slow


def test_digits_dfad_demo_reaches_90_percent_of_teacher(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([PYTHON, "-m", "accelerate_dfkd", str(REPO / "recipes/digits/dfad.yaml"), "--output_dir", str(out),
                    "--progress_bar", "false"], env=cli_env(), cwd=REPO, check=True, timeout=1800)
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_top1"] >= 95.0
    assert results["student_top1"] >= 0.9 * results["teacher_top1"], results
