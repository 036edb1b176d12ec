"""Synthetic data: the write side (Synthesizer) and the read side (sources, replay buffers)."""

from .base import SynthesisContext, SynthesisOutput, Synthesizer, SyntheticBatch
from .replay import ReplayBuffer
from .sources import DataLoaderSource, GeneratorSource, MixedSource, ReplaySource, SyntheticSource

__all__ = [
    "SynthesisContext", "SynthesisOutput", "Synthesizer", "SyntheticBatch", "ReplayBuffer",
    "SyntheticSource", "GeneratorSource", "ReplaySource", "MixedSource", "DataLoaderSource",
]
