"""accelerate_dfkd: data-free knowledge distillation on HuggingFace Accelerate.

A method is a Synthesizer (write side: one synthesis round), a SyntheticSource (read side: a torch
IterableDataset of batches) and a loss hook; the Distiller runs them in one Accelerate loop.
"""

from .callbacks import Callback, TrainerState
from .config import ConfigError, DistillConfig, MethodConfig, load_recipe
from .distiller import Distiller
from .methods import METHODS
from .models import GENERATORS, MODELS, build_generator, build_model
from .synthesis import (DataLoaderSource, GeneratorSource, MixedSource, ReplayBuffer, ReplaySource,
                        SynthesisContext, SynthesisOutput, Synthesizer, SyntheticBatch, SyntheticSource)

__version__ = "0.1.0"

# The integrations import transformers / datasets, so they load on first use (PEP 562): a plain
# `import accelerate_dfkd` (the CLI, every rank of a launch) does not pay for them.
_INTEGRATIONS = {
    "SyntheticDataset": "trainer", "SyntheticDataCallback": "trainer",
    "DatasetSource": "datasets_io", "export_synthetic_dataset": "datasets_io", "load_synthetic_dataset": "datasets_io",
}


def __getattr__(name: str):
    if name in _INTEGRATIONS:
        import importlib

        return getattr(importlib.import_module(f".integrations.{_INTEGRATIONS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Callback", "TrainerState", "ConfigError", "DistillConfig", "MethodConfig", "load_recipe", "Distiller",
    "METHODS", "MODELS", "GENERATORS", "build_model", "build_generator", "DataLoaderSource", "GeneratorSource",
    "MixedSource", "ReplayBuffer", "ReplaySource", "SynthesisContext", "SynthesisOutput", "Synthesizer",
    "SyntheticBatch", "SyntheticSource", *_INTEGRATIONS,
]
