"""Training a teacher on real data: the entry point, its outputs, its refusals."""

import json
import subprocess

import pytest

from accelerate_dfkd.config import ConfigError
from accelerate_dfkd.evaluation import default_data_dir
from accelerate_dfkd.train_teacher import main

from .conftest import PYTHON, REPO, cli_env


def test_digits_teacher_trains_and_is_not_overwritten(tmp_path):
    out = tmp_path / "t.safetensors"
    report = main(None, {"model": "digits_cnn", "dataset": "digits", "image_size": "8", "epochs": "10", "learning_rate": "1e-2",
                         "output": str(out), "num_threads": "1"})
    assert report["test_top1"] > 90 and out.is_file()  # 97-98 observed
    assert json.loads(out.with_suffix(".json").read_text())["test_top1"] == report["test_top1"]
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        main(None, {"model": "digits_cnn", "dataset": "digits", "image_size": "8", "output": str(out)})
    assert out.read_bytes() == before
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        main(None, {"epoch": "3"})


@pytest.mark.skipif(not (default_data_dir() / "mnist").is_dir(), reason="MNIST not in ../shared/data (DFKD_DATA_DIR)")
def test_mnist_lenet5_recipe_runs_through_the_cli(tmp_path):
    """The real recipe on a 6,000-image subset for two epochs: the loader, the checksums, the 32x32 padding."""
    out = tmp_path / "lenet5.safetensors"
    proc = subprocess.run([PYTHON, "-m", "accelerate_dfkd", "train-teacher", str(REPO / "recipes/mnist/teacher_lenet5.yaml"),
                           "--epochs", "2", "--max_train_samples", "6000", "--learning_rate", "3e-3", "--output", str(out)],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["train_samples"] == 6000 and report["test_top1"] > 80, report  # 91.6 observed
