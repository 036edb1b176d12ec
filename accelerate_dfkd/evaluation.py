"""Real data: the only place it enters. Held-out sets evaluate students; training splits train
teachers. A DFKD method never sees any of it.

Data sets are small tensors in memory: sklearn's digits (shipped inside scikit-learn), MNIST
from IDX files under `data_dir` (default `$DFKD_DATA_DIR`, else `../shared/data` next to the
repository), checked against the published checksums, and `shapes`, a segmentation set drawn
procedurally from a fixed seed (coloured circles, squares and triangles on noisy backgrounds).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError
from .utils import logits_of


class DataError(FileNotFoundError):
    """Real data that should be there is missing or corrupt; the message says where to put it."""


@dataclass
class LabeledImages:
    """Normalised images (N, C, H, W) float32 and their labels: (N,) int64 class indices, or
    (N, H, W) int64 per-pixel classes for segmentation (IGNORE_INDEX marks pixels not scored)."""

    images: Tensor
    labels: Tensor
    name: str
    # The normalisation applied, per channel for pixels in [0, 1]: images = (pixels - mean) / std.
    # None when unknown (then the set cannot be re-normalised for a teacher that expects another one).
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def renormalized(self, mean: Sequence[float], std: Sequence[float]) -> "LabeledImages":
        """The same images normalised with another (mean, std): a teacher's input space
        (e.g. a transformers image processor's image_mean / image_std)."""
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if (mean, std) == (self.mean, self.std):
            return self
        if self.mean is None or self.std is None:
            raise DataError(f"eval set {self.name} has an unknown normalisation, so it cannot be re-normalised "
                            "to the teacher's; normalise it yourself")
        channels = self.images.shape[1]
        shape = (1, channels, 1, 1)

        def per_channel(values: tuple[float, ...], what: str) -> Tensor:
            if len(values) not in (1, channels):
                raise DataError(f"{what} has {len(values)} values but {self.name} has {channels} channels")
            return torch.tensor(values, dtype=self.images.dtype).expand(channels).reshape(shape)

        pixels = self.images * per_channel(self.std, "its std") + per_channel(self.mean, "its mean")
        images = (pixels - per_channel(mean, "image_mean")) / per_channel(std, "image_std")
        return LabeledImages(images, self.labels, self.name, mean, std)

    def subset(self, max_samples: Optional[int], seed: int = 0) -> "LabeledImages":
        """A fixed random subset of at most `max_samples` items (the same on every rank and machine)."""
        if not max_samples or max_samples >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:max_samples]
        return LabeledImages(self.images[index], self.labels[index], f"{self.name}[{max_samples}]", self.mean, self.std)


Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def resolve_input_normalization(image_mean: Optional[Sequence[float]], image_std: Optional[Sequence[float]],
                                teacher: Optional[nn.Module] = None,
                                eval_data: Optional[LabeledImages] = None) -> Optional[Normalization]:
    """The teacher's input normalisation (mean, std), per channel for pixels in [0, 1], from the first
    source that states one: the recipe's `image_mean` / `image_std`, else the teacher's declared
    `image_mean` / `image_std` attributes (a transformers model's image processor,
    integrations/hf_models.py), else the evaluation set's normalisation (`eval_data.mean` / `.std`, the
    data set's default). None when none is known. The one place this is decided: the CLI normalises
    real images with it and the Distiller hands it to the synthesizer (SynthesisContext.image_mean)."""
    if (image_mean is None) != (image_std is None):
        raise ConfigError("image_mean and image_std go together: give both (per channel, for pixels in [0, 1])")
    candidates = ((image_mean, image_std),
                  (getattr(teacher, "image_mean", None), getattr(teacher, "image_std", None)),
                  (eval_data.mean, eval_data.std) if eval_data is not None else (None, None))
    for mean, std in candidates:
        if mean is not None and std is not None:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return None


def recipe_input_normalization(config: Any, teacher: Optional[nn.Module] = None) -> Optional[Normalization]:
    """resolve_input_normalization for a recipe (a DistillConfig) run without its eval set in memory (the
    `synthesize` export, SyntheticDataset.from_recipe): the eval set is read (one image) only when neither
    the recipe nor the teacher states a normalisation, and one that is missing on disk counts as unknown."""
    found = resolve_input_normalization(config.image_mean, config.image_std, teacher)
    if found is not None or config.eval_dataset == "none":
        return found
    try:
        eval_data = load_eval_set(config.eval_dataset, config.image_size, config.data_dir,
                                  in_channels=config.in_channels, max_samples=1)
    except DataError:
        return None
    return resolve_input_normalization(None, None, None, eval_data)


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
    return LabeledImages(images, torch.from_numpy(digits.target[idx]).long(), f"digits-{split}",
                         (DIGITS_MEAN,), (DIGITS_STD,))


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
    return LabeledImages((images - MNIST_MEAN) / MNIST_STD, labels, f"mnist-{split}", (MNIST_MEAN,), (MNIST_STD,))


# --- shapes: a procedural segmentation set -------------------------------------------------------
# Pixels that no metric or loss counts: the 255 "void" label of PASCAL VOC / CamVid / NYUv2 loaders.
IGNORE_INDEX = 255
SHAPES_CLASSES = ("background", "circle", "square", "triangle")
# Fixed seeds: every machine draws the same images; train and test never share one.
SHAPES_SEEDS = {"train": 0, "test": 1}
SHAPES_SIZES = {"train": 4000, "test": 500}
SHAPES_MEAN, SHAPES_STD = 0.5, 0.3  # of the RGB values in [0, 1] (measured 0.50 / 0.30 on the train split)


def _draw_shapes_image(size: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """One (3, size, size) image in [0, 1] and its (size, size) labels: 1 to 3 shapes of random class,
    colour, position and size, drawn in order (later shapes cover earlier ones) on a background of a
    random colour, with Gaussian pixel noise. A one-pixel band on each shape's boundary is labelled
    IGNORE_INDEX (VOC-style void boundaries: at 32x32 the boundary pixel's class is ambiguous)."""
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=rng))

    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    ys, xs = ys / size, xs / size  # pixel centres in the unit square
    image = torch.rand(3, 1, 1, generator=rng).expand(3, size, size).clone()
    labels = torch.zeros(size, size, dtype=torch.long)
    for _ in range(int(torch.randint(1, 4, (), generator=rng))):
        cls = int(torch.randint(1, len(SHAPES_CLASSES), (), generator=rng))
        r = uniform(0.12, 0.28)  # half-extent, in image widths
        cy, cx = uniform(r, 1 - r), uniform(r, 1 - r)
        if SHAPES_CLASSES[cls] == "circle":
            mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= r**2
        elif SHAPES_CLASSES[cls] == "square":
            mask = ((ys - cy).abs() <= r * 0.85) & ((xs - cx).abs() <= r * 0.85)  # about a circle's area
        else:  # an upward triangle: below its apex, above its base, inside both slanted sides
            dy = ys - (cy - r)
            mask = (dy >= 0) & (ys <= cy + r) & ((xs - cx).abs() <= dy / 2 * 1.2)
        colour = torch.rand(3, 1, 1, generator=rng)
        image = torch.where(mask, colour, image)
        labels[mask] = cls
    image = (image + 0.08 * torch.randn(3, size, size, generator=rng)).clamp(0, 1)
    # a pixel whose 4-neighbourhood holds another class lies on a boundary
    padded = F.pad(labels[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
    boundary = torch.zeros_like(labels, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        boundary |= padded[dy:dy + size, dx:dx + size].long() != labels
    labels[boundary] = IGNORE_INDEX
    return image, labels


def load_shapes_split(split: Literal["train", "test"], image_size: int = 32,
                      num_images: Optional[int] = None) -> LabeledImages:
    """The procedural shapes segmentation set (4 classes with background, per-pixel labels),
    deterministic from its split's seed. Not real data: a stand-in a teacher trains on in a minute,
    so segmentation distillation is tested end to end with no download."""
    rng = torch.Generator().manual_seed(SHAPES_SEEDS[split])
    count = num_images or SHAPES_SIZES[split]
    pairs = [_draw_shapes_image(image_size, rng) for _ in range(count)]
    images = torch.stack([image for image, _ in pairs])
    labels = torch.stack([label for _, label in pairs])
    return LabeledImages((images - SHAPES_MEAN) / SHAPES_STD, labels, f"shapes-{split}", (SHAPES_MEAN,), (SHAPES_STD,))


# --- image folders, read through `datasets` ------------------------------------------------------
# The torchvision / ImageNet statistics: what the akamaster CIFAR ResNets expect (shared/data/README.md)
# and the usual default of image folders; a teacher trained otherwise says so with image_mean/image_std.
from .models.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
CIFAR10_JPEG_TEST_ARCHIVE = "cifar10_jpeg_test.tar.gz"  # test/<class>/NNNN.jpg, classes in CIFAR-10 order
_SPLIT_FOLDERS = ("test", "validation", "val", "valid")  # held-out splits, in order of preference


def _eval_cache_dir() -> Path:
    from .teachers import cache_dir  # late: teachers imports this module

    return cache_dir() / "data"


def load_imagefolder(folder: str | Path, *, image_size: int, in_channels: int = 3,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                     max_samples: Optional[int] = None, name: Optional[str] = None) -> LabeledImages:
    """Images in class subfolders (`<class>/<image>`, classes numbered in sorted order), read with
    `datasets`' `imagefolder` builder. A folder holding a held-out split (test/, validation/, val/,
    valid/) is read from that split. Images are converted to RGB (3 channels) or L (1 channel),
    resized to image_size x image_size (PIL bilinear, as transformers' image processors do; no crop),
    scaled to [0, 1] and normalised with (mean, std): the teacher's (default: ImageNet's for 3
    channels, 0.5 / 0.5 otherwise). `max_samples` keeps a fixed random subset, drawn before decoding."""
    try:
        import datasets
        from PIL import Image
    except ImportError as err:
        raise DataError(f"image-folder evaluation sets need datasets and pillow: pip install 'accelerate_dfkd[hf]' "
                        f"({err})") from None
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; give a folder of <class>/<image> files")
    folder = next((folder / s for s in _SPLIT_FOLDERS if (folder / s).is_dir()), folder)
    if in_channels not in (1, 3):
        raise DataError(f"image folders are read as RGB or grayscale; in_channels={in_channels} is neither")
    if mean is None or std is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else ((0.5,), (0.5,))
    # One explicit pattern: with data_dir, datasets globs ~60 split-name patterns over every file
    # (50 s for the 10,000 CIFAR-10 JPEGs on a busy 2-core machine, against 2-6 s this way).
    try:
        ds = datasets.load_dataset("imagefolder", data_files={"test": str(folder / "*" / "*")},
                                   cache_dir=str(_eval_cache_dir() / "hf"), split="test")
    except (FileNotFoundError, ValueError) as err:  # no <class>/<file> at all, or none an image
        raise DataError(f"no images found as <class>/<image> in {folder} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if "label" not in ds.features:
        raise DataError(f"{folder} has no class subfolders: expected <class>/<image> files")
    if max_samples and max_samples < len(ds):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:max_samples]
        ds = ds.select(order.tolist())
    mode = "RGB" if in_channels == 3 else "L"
    pixels, labels = [], []
    for batch in ds.iter(batch_size=256):  # batched reads: item by item is 10x slower (environment.md s.5)
        for image in batch["image"]:
            image = image.convert(mode)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            pixels.append(np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, in_channels))
        labels.extend(batch["label"])
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
    data = LabeledImages(images, torch.tensor(labels, dtype=torch.long), name or f"imagefolder:{folder}",
                         (0.0,) * in_channels, (1.0,) * in_channels)
    return data.renormalized(mean, std)


def cifar10_jpeg_folder(data_dir: Optional[str | Path] = None) -> Path:
    """The CIFAR-10 JPEG test folder: `<data_dir>/cifar10-jpeg/test` if already extracted, else the
    archive extracted once into the cache (atomically: parallel ranks may race)."""
    import tarfile

    root = Path(data_dir) if data_dir else default_data_dir()
    base = root / "cifar10-jpeg" if (root / "cifar10-jpeg").is_dir() else root
    if (base / "test").is_dir():
        return base / "test"
    archive = base / CIFAR10_JPEG_TEST_ARCHIVE
    if not archive.is_file():
        raise DataError(f"{archive} not found: put the CIFAR-10 JPEG test archive in <data_dir>/cifar10-jpeg/ and "
                        "pass --data_dir, or set DFKD_DATA_DIR; or use --eval_dataset none")
    target = _eval_cache_dir() / "cifar10-jpeg"
    if not (target / "test").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".extract-{os.getpid()}"
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links or devices from the archive
        try:
            os.replace(tmp / "test", target / "test")
        except OSError:  # another rank finished first
            if not (target / "test").is_dir():
                raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target / "test"


def load_eval_set(name: str, image_size: int, data_dir: Optional[str] = None, *, in_channels: int = 3,
                  mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                  max_samples: Optional[int] = None) -> Optional[LabeledImages]:
    """The held-out set `name`, resized to image_size. (mean, std), when given, replace the set's
    default normalisation (the teacher's input space); `max_samples` keeps a fixed random subset."""
    if name == "none":
        return None
    if name == "digits":
        data = load_digits_split("test", image_size)
    elif name == "mnist":
        data = load_mnist_split("test", image_size, data_dir)
    elif name == "shapes":
        data = load_shapes_split("test", image_size)
    elif name == "nyuv2":  # named by recipes/nyuv2/*.yaml
        raise DataError("eval_dataset nyuv2: the NYUv2 loader is not part of accelerate_dfkd yet. DFAD needs no "
                        "data to distil: pass --eval_dataset none (and evaluate the student yourself), or add a "
                        "loader to evaluation.py")
    elif name == "cifar10_jpeg":
        return load_imagefolder(cifar10_jpeg_folder(data_dir), image_size=image_size, in_channels=in_channels,
                                mean=mean, std=std, max_samples=max_samples, name="cifar10_jpeg-test")
    elif name.startswith("imagefolder:"):
        return load_imagefolder(name[len("imagefolder:"):], image_size=image_size, in_channels=in_channels,
                                mean=mean, std=std, max_samples=max_samples, name=name)
    else:
        raise DataError(f"unknown eval_dataset {name!r}; known: digits, mnist, shapes, cifar10_jpeg, "
                        "imagefolder:<folder of <class>/<image> files>, none")
    if mean is not None and std is not None:
        data = data.renormalized(mean, std)
    return data.subset(max_samples)


def evaluate_top1(model: nn.Module, data: LabeledImages, *, num_classes: Optional[int] = None, batch_size: int = 512,
                  device: torch.device | str = "cpu", process_index: int = 0, num_processes: int = 1) -> float:
    """Top-1 accuracy in percent (evaluate_classifier with top-1 only)."""
    return evaluate_classifier(model, data, num_classes=num_classes, batch_size=batch_size, device=device,
                               process_index=process_index, num_processes=num_processes, top_k=(1,))["top1"]


class EvaluateMetric:
    """A HuggingFace `evaluate` module (`evaluate.load(...)`) as an evaluation metric.

    predictions are the argmax over classes (dim 1 of the logits), references the labels. Under
    several processes every rank's predictions are gathered, rank 0 computes, and the result is
    broadcast, so every rank logs the same number (evaluate's own multi-process mode needs a shared
    cache folder and a process count fixed at load time). `compute_kwargs` go to `compute()`, e.g.
    `EvaluateMetric(evaluate.load("f1"), average="macro")`. Note that `evaluate.load("<name>")`
    fetches the metric script from the Hub: offline, load a local script by path instead.
    """

    def __init__(self, module: Any, **compute_kwargs: Any) -> None:
        if not (hasattr(module, "add_batch") and hasattr(module, "compute")):
            raise TypeError(f"EvaluateMetric wraps an evaluate module (add_batch/compute), got {type(module).__name__}")
        self.module, self.compute_kwargs = module, compute_kwargs
        self.predictions: list[Tensor] = []
        self.references: list[Tensor] = []

    def reset(self) -> None:
        self.predictions, self.references = [], []

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.predictions.append(logits.argmax(dim=1).flatten().cpu())
        self.references.append(labels.flatten().cpu())

    def compute(self) -> dict[str, Any]:
        import torch.distributed as dist

        predictions = torch.cat(self.predictions).tolist() if self.predictions else []
        references = torch.cat(self.references).tolist() if self.references else []
        self.reset()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.module.compute(predictions=predictions, references=references, **self.compute_kwargs)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (predictions, references))
        result: list[Any] = [None]
        if dist.get_rank() == 0:
            result[0] = self.module.compute(predictions=[p for g in gathered for p in g[0]],
                                            references=[r for g in gathered for r in g[1]], **self.compute_kwargs)
        dist.broadcast_object_list(result, src=0)
        return result[0]


def _as_metric(metric: Any, device: torch.device | str) -> Any:
    """torchmetrics metrics as they are (moved to `device`; they sync across ranks in compute()),
    evaluate modules wrapped in EvaluateMetric, anything else with update(logits, labels) /
    compute() / reset() as it is."""
    if hasattr(metric, "add_batch") and not hasattr(metric, "update"):
        return EvaluateMetric(metric)
    if not (hasattr(metric, "update") and hasattr(metric, "compute")):
        raise TypeError(f"an evaluation metric needs update(logits, labels) and compute(); "
                        f"{type(metric).__name__} has not")
    return metric.to(device) if isinstance(metric, nn.Module) else metric


def _scores(name: str, value: Any) -> dict[str, float]:
    """A metric's compute() result as flat floats: a scalar -> {name}; a dict with one entry ->
    {name}; several entries -> {name/key}; a tensor of several values -> {name/index}."""
    if isinstance(value, Mapping):
        entries = {k: v for k, v in value.items() if isinstance(v, (int, float, Tensor, np.number))}
        if len(entries) == 1:
            return _scores(name, next(iter(entries.values())))
        return {k2: v2 for k, v in entries.items() for k2, v2 in _scores(f"{name}/{k}", v).items()}
    if isinstance(value, Tensor) and value.numel() > 1:
        return {f"{name}/{i}": float(v) for i, v in enumerate(value.flatten().tolist())}
    return {name: float(value)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: LabeledImages, *, num_classes: Optional[int] = None,
                        batch_size: int = 512, device: torch.device | str = "cpu", process_index: int = 0,
                        num_processes: int = 1, metrics: Optional[Mapping[str, Any]] = None,
                        top_k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Scores of `model` on `data`: `top1`, `top5` (when num_classes >= 5), in percent, from
    torchmetrics, plus each of `metrics` ({name: metric}: torchmetrics metrics, `evaluate` modules or
    EvaluateMetric, anything with update(logits, labels) / compute() / reset()), whose values are
    reported as they come (see _scores for the keys). Per-pixel labels (N, H, W) get the built-in `miou`
    (mean IoU in percent, pixels labelled IGNORE_INDEX not scored, see evaluate_miou) instead of top-k.

    Each rank scores its own slice (rank::world, no padding, so no duplicates) and the metrics are
    synchronised in compute() (torchmetrics all-gathers its counts: exact for uneven shards), so
    every rank returns the same numbers; every rank must call this.
    """
    from torchmetrics.classification import MulticlassAccuracy

    num_classes = num_classes or int(data.labels.max()) + 1
    built_in: dict[str, Any] = {}
    if data.labels.dim() == 1:
        built_in = {f"top{k}": MulticlassAccuracy(num_classes=num_classes, average="micro", top_k=k)
                    for k in top_k if k <= num_classes}
    else:  # segmentation
        from torchmetrics.classification import MulticlassJaccardIndex

        # one confusion matrix over the whole set; a class absent from labels and predictions is left
        # out of the mean (VainF utils/stream_metrics.py: nanmean of the per-class IoU)
        built_in = {"miou": MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=IGNORE_INDEX)}
    # user metrics by name, prefixed by nothing: a name clash with a built-in is an error
    clash = set(built_in) & set(metrics or {})
    if clash:
        raise ValueError(f"metric names {sorted(clash)} are taken by the built-in top-k accuracies; rename them")
    active = {name: _as_metric(m, device) for name, m in {**built_in, **(metrics or {})}.items()}
    for metric in active.values():
        if hasattr(metric, "reset"):
            metric.reset()
    was_training = model.training
    model.eval()
    images, labels = data.images[process_index::num_processes], data.labels[process_index::num_processes]
    try:
        for start in range(0, len(labels), batch_size):
            logits = logits_of(model(images[start:start + batch_size].to(device))).float()
            target = labels[start:start + batch_size].to(device)
            for metric in active.values():
                metric.update(logits, target)
    finally:
        model.train(was_training)
    scores: dict[str, float] = {}
    for name, metric in active.items():
        value = metric.compute()
        scores.update({name: 100.0 * float(value)} if name in built_in else _scores(name, value))
    return scores


def evaluate_miou(model: nn.Module, data: LabeledImages, *, num_classes: int, batch_size: int = 256,
                  device: torch.device | str = "cpu", process_index: int = 0, num_processes: int = 1) -> float:
    """Mean intersection-over-union in percent over the whole set (the paper's "mIoU on the whole test
    set"), from one confusion matrix as VainF utils/stream_metrics.py: pixels labelled IGNORE_INDEX are
    not scored, a class absent from both labels and predictions is left out of the mean. Each rank
    scores its slice and torchmetrics sums the matrices (evaluate_classifier with per-pixel labels)."""
    if data.labels.dim() != 3:
        raise ValueError(f"mIoU needs per-pixel labels (N, H, W); {data.name} has labels of shape {tuple(data.labels.shape)}")
    return evaluate_classifier(model, data, num_classes=num_classes, batch_size=batch_size, device=device,
                               process_index=process_index, num_processes=num_processes)["miou"]
