"""Synthetic data: the write side (Synthesizer) and the read side (sources, replay buffers)."""

from .base import SynthesisContext, SynthesisOutput, Synthesizer, SyntheticBatch
from .replay import ReplayBuffer
from .sources import DataLoaderSource, GeneratorSource, MixedSource, ReplaySource, SyntheticSource
from .replay import PriorityReplayBuffer, PrioritySource
from .augment import Augment, random_crop_with_padding, random_horizontal_flip, random_resized_crop

__all__ = [
    "SynthesisContext", "SynthesisOutput", "Synthesizer", "SyntheticBatch", "ReplayBuffer",
    "SyntheticSource", "GeneratorSource", "ReplaySource", "MixedSource", "DataLoaderSource",
    "PriorityReplayBuffer", "PrioritySource",
    "Augment", "random_crop_with_padding", "random_horizontal_flip", "random_resized_crop",
]
