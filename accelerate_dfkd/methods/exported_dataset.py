"""KD on an exported synthetic set: no synthesis, the student reads a dataset written by
`accelerate-dfkd synthesize` (integrations/datasets_io.py) and learns from the teacher's outputs on it.

Not a paper's method: the "method-free" baseline of a fixed synthetic set (Hinton et al.'s KD on
whatever data is at hand), and the way to reuse one expensive synthesis (DeepInversion's pixel
optimisation) for many students. The teacher is still queried on every batch by the Distiller, so
the stored teacher columns are for users without the teacher; KD at temperature T uses fresh logits.

    method: exported_dataset
    dataset_path: runs/synthetic_digits      # a `disk` export folder or a .parquet file
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from torch import nn

from ..config import ConfigError, MethodConfig
from ..synthesis.base import SynthesisOutput, Synthesizer


@dataclass
class ExportedDatasetConfig(MethodConfig):
    dataset_path: Optional[str] = None
    # KL at T = 1: the MethodConfig default, as the zju-vipa loop's KLDiv() for generator methods
    # (implementations.md 1.2); set temperature for Hinton-style softened targets.
    student_loss: Literal["kl", "l1"] = "kl"
    temperature: float = 1.0
    shuffle: bool = True  # a new permutation of the set every epoch

    def validate(self) -> None:
        if not self.dataset_path:
            raise ConfigError("method exported_dataset needs dataset_path: the output of `accelerate-dfkd synthesize`")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")


class ExportedDataset(Synthesizer):
    name = "exported_dataset"
    config_class = ExportedDatasetConfig
    paper = "none: KD (Hinton et al., 2015) on a synthetic set exported by `accelerate-dfkd synthesize`"
    config: ExportedDatasetConfig

    def __init__(self, config: ExportedDatasetConfig, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(config, teacher, **kwargs)
        config.validate()
        from ..integrations.datasets_io import load_synthetic_dataset

        dataset, record = load_synthetic_dataset(config.dataset_path)
        shape = tuple(dataset.features["image"].shape)
        if shape != tuple(self.image_shape):
            raise ConfigError(f"{config.dataset_path} holds images of shape {shape}, but this run's teacher takes "
                              f"{tuple(self.image_shape)}: set in_channels / image_size to match the export")
        if record.get("num_classes") not in (None, self.num_classes):
            raise ConfigError(f"{config.dataset_path} was exported for {record['num_classes']} classes, this run has "
                              f"num_classes={self.num_classes}")

    def synthesize(self, student: nn.Module, lr_scale: float = 1.0) -> SynthesisOutput:
        """Nothing to synthesize: the data are fixed."""
        self.rounds += 1
        return SynthesisOutput()

    def build_source(self, batch_size: int):
        from ..integrations.datasets_io import DatasetSource

        return DatasetSource(self.config.dataset_path, batch_size, self.context.make_rng(stream=1),
                             device=self.context.device, shuffle=self.config.shuffle)
