"""Synthetic data: the write side (Synthesizer) and the read side (sources, replay buffers)."""

from .augment import Augment, random_crop_with_padding, random_horizontal_flip, random_resized_crop
from .base import SynthesisContext, SynthesisOutput, Synthesizer, SyntheticBatch
from .replay import (REPLAY_DTYPES, DiskReplayBuffer, PriorityReplayBuffer, ReplayBuffer, ReplayStorageConfig,
                     build_replay_buffer)
from .sources import (DataLoaderSource, GeneratorSource, MixedSource, PrioritySource, ReplaySource,
                      SyntheticSource)

__all__ = [
    "SynthesisContext", "SynthesisOutput", "Synthesizer", "SyntheticBatch", "ReplayBuffer",
    "SyntheticSource", "GeneratorSource", "ReplaySource", "MixedSource", "DataLoaderSource",
    "PriorityReplayBuffer", "PrioritySource", "DiskReplayBuffer", "build_replay_buffer", "REPLAY_DTYPES",
    "ReplayStorageConfig",
    "Augment", "random_crop_with_padding", "random_horizontal_flip", "random_resized_crop",
]
