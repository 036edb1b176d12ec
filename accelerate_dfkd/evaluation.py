"""Real data: the only place it enters. Held-out sets evaluate students; training splits train
teachers. A DFKD method never sees any of it.

Data sets are small tensors in memory: sklearn's digits (shipped inside scikit-learn) and MNIST
from IDX files under `data_dir` (default `$DFKD_DATA_DIR`, else `../shared/data` next to the
repository), checked against the published checksums.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import logits_of


class DataError(FileNotFoundError):
    """Real data that should be there is missing or corrupt; the message says where to put it."""


@dataclass
class LabeledImages:
    """Normalised images (N, C, H, W) float32 and their labels (N,) int64."""

    images: Tensor
    labels: Tensor
    name: str

    def __len__(self) -> int:
        return len(self.labels)


# Statistics of the digits 70% training split (pixels scaled to [0, 1] by /16), computed once:
# fixed constants so a teacher and its evaluation agree whatever code path loads them.
DIGITS_MEAN, DIGITS_STD = 0.3056, 0.3761
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the MNIST train-set statistics used by every DFKD repo

MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}


def default_data_dir() -> Path:
    env = os.environ.get("DFKD_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _resize(images: Tensor, image_size: int) -> Tensor:
    if images.shape[-1] == image_size:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)


def load_digits_split(split: Literal["train", "test"], image_size: int = 8) -> LabeledImages:
    """sklearn's 8x8 digits, a fixed stratified 70/30 split (random_state 0), normalised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    idx_train, idx_test = train_test_split(np.arange(len(x)), test_size=0.3, random_state=0, stratify=digits.target)
    idx = idx_train if split == "train" else idx_test
    images = torch.from_numpy(x[idx]).unsqueeze(1)
    images = (_resize(images, image_size) - DIGITS_MEAN) / DIGITS_STD
    return LabeledImages(images, torch.from_numpy(digits.target[idx]).long(), f"digits-{split}")


def _read_idx(path: Path) -> np.ndarray:
    expected = MNIST_SHA256.get(path.name)
    raw = path.read_bytes()
    if expected and hashlib.sha256(raw).hexdigest() != expected:
        raise DataError(f"{path} does not match its published sha256; the file is corrupt or not MNIST")
    data = gzip.decompress(raw)
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist_split(split: Literal["train", "test"], image_size: int = 32,
                     data_dir: Optional[str | Path] = None) -> LabeledImages:
    """MNIST from the four IDX gz files; 28x28 zero-padded to 32x32 for LeNet-5 as the DFKD papers do."""
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root / "mnist" if (root / "mnist").is_dir() else root
    prefix = "train" if split == "train" else "t10k"
    files = [folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"MNIST {split} files not found: {missing}. Put the IDX gz files in <data_dir>/mnist/ "
                        "and pass --data_dir, or set DFKD_DATA_DIR; or use --eval_dataset none")
    images = torch.from_numpy(_read_idx(files[0]).astype(np.float32) / 255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(files[1]).astype(np.int64))
    if image_size == 32:
        images = F.pad(images, (2, 2, 2, 2))
    else:
        images = _resize(images, image_size)
    return LabeledImages((images - MNIST_MEAN) / MNIST_STD, labels, f"mnist-{split}")


def load_eval_set(name: str, image_size: int, data_dir: Optional[str] = None) -> Optional[LabeledImages]:
    if name == "none":
        return None
    if name == "digits":
        return load_digits_split("test", image_size)
    if name == "mnist":
        return load_mnist_split("test", image_size, data_dir)
    raise DataError(f"unknown eval_dataset {name!r}; known: digits, mnist, none")


@torch.no_grad()
def evaluate_top1(model: nn.Module, data: LabeledImages, *, num_classes: Optional[int] = None, batch_size: int = 512,
                  device: torch.device | str = "cpu", process_index: int = 0, num_processes: int = 1) -> float:
    """Top-1 accuracy in percent. Each rank scores its own slice (rank::world, no padding, so no
    duplicates) and torchmetrics all-gathers the counts: exact for uneven shards."""
    from torchmetrics.classification import MulticlassAccuracy

    num_classes = num_classes or int(data.labels.max()) + 1
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    was_training = model.training
    model.eval()
    images, labels = data.images[process_index::num_processes], data.labels[process_index::num_processes]
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device)
        logits = logits_of(model(x))
        metric.update(logits.float(), labels[start:start + batch_size].to(device))
    model.train(was_training)
    return 100.0 * float(metric.compute())
