"""The read side: synthetic sources are torch IterableDatasets that yield whole batches.

Iterate them directly (or in a DataLoader with `batch_size=None, num_workers=0`): a live generator
must stay in the training process, and each rank draws from its own random stream. Never pass a
live source through `accelerator.prepare`, or rank 0 would generate for everyone (DESIGN.md fact 1).
Reading a source never trains anything; `Synthesizer.synthesize()` does.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset

from ..hooks import training_mode
from .base import SyntheticBatch
from .replay import PriorityReplayBuffer, ReplayBuffer


class SyntheticSource(IterableDataset):
    """An endless stream of `SyntheticBatch`es with resumable state."""

    def __iter__(self) -> Iterator[SyntheticBatch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> SyntheticBatch:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _rng_state(rng: torch.Generator) -> Tensor:
    return rng.get_state()


class GeneratorSource(SyntheticSource):
    """Fresh samples from a live generator on fresh latents, without gradients.

    `generator_train_mode` keeps the generator's BatchNorm in batch-statistics mode while sampling,
    as the DFAD reference does (VainF DFAD_cifar.py draws `generator(z).detach()` after
    `generator.train()`); the zju-vipa CMI repo samples in eval mode instead.
    """

    def __init__(self, generator: nn.Module, nz: int, batch_size: int, rng: torch.Generator,
                 transform: Optional[Callable[[Tensor], Tensor]] = None, generator_train_mode: bool = True) -> None:
        self.generator, self.nz, self.batch_size, self.rng = generator, nz, batch_size, rng
        self.transform = transform
        self.generator_train_mode = generator_train_mode

    @torch.no_grad()
    def next_batch(self) -> SyntheticBatch:
        z = torch.randn(self.batch_size, self.nz, generator=self.rng, device=self.rng.device)
        with training_mode(self.generator, self.generator_train_mode):
            images = self.generator(z)
        if self.transform is not None:
            images = self.transform(images)
        return SyntheticBatch(images=images)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])


class ReplaySource(SyntheticSource):
    """Uniform samples from a replay buffer (the buffer itself belongs to the synthesizer)."""

    def __init__(self, buffer: ReplayBuffer, batch_size: int, rng: torch.Generator) -> None:
        self.buffer, self.batch_size, self.rng = buffer, batch_size, rng

    def next_batch(self) -> SyntheticBatch:
        images, idx = self.buffer.sample(self.batch_size, self.rng)
        return SyntheticBatch(images=images, indices=idx)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])


class PrioritySource(SyntheticSource):
    """Prioritised samples from a PriorityReplayBuffer, with their slots (`indices`, for
    `update_priorities`) and normalised importance-sampling weights (`weights`, per-sample loss weights)."""

    def __init__(self, buffer: PriorityReplayBuffer, batch_size: int, rng: torch.Generator) -> None:
        self.buffer, self.batch_size, self.rng = buffer, batch_size, rng

    def next_batch(self) -> SyntheticBatch:
        images, idx, weights = self.buffer.sample(self.batch_size, self.rng)
        return SyntheticBatch(images=images, weights=weights, indices=idx)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])


class MixedSource(SyntheticSource):
    """Concatenates a batch from each source (e.g. novel generator samples + replayed ones, the
    PRE-DFKD student batch). Per-sample weights default to 1 where a source gives none."""

    def __init__(self, sources: Sequence[SyntheticSource]) -> None:
        if not sources:
            raise ValueError("MixedSource needs at least one source")
        self.sources = list(sources)

    def next_batch(self) -> SyntheticBatch:
        batches = [s.next_batch() for s in self.sources]
        images = torch.cat([b.images for b in batches])
        weights = None
        if any(b.weights is not None for b in batches):
            weights = torch.cat([b.weights if b.weights is not None else torch.ones(len(b), device=b.images.device)
                                 for b in batches])
        return SyntheticBatch(images=images, weights=weights)

    def state_dict(self) -> dict[str, Any]:
        return {"sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for source, sub in zip(self.sources, state["sources"]):
            source.load_state_dict(sub)


class DataLoaderSource(SyntheticSource):
    """Real images for the upper-bound baseline (KD with the original data, the papers' KD-ORI row).

    Shuffles `images` with its own generator; the position in the epoch is part of the state, so a
    resumed run continues mid-epoch. The labels ride along as `targets` and are not used by KD.
    """

    def __init__(self, images: Tensor, targets: Optional[Tensor], batch_size: int, rng: torch.Generator,
                 device: torch.device | str = "cpu") -> None:
        self.images, self.targets, self.batch_size, self.rng = images, targets, batch_size, rng
        self.device = torch.device(device)
        self.order: Optional[Tensor] = None
        self.position = 0

    def next_batch(self) -> SyntheticBatch:
        if self.order is None or self.position + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.images), generator=self.rng, device=self.rng.device).cpu()
            self.position = 0
        idx = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        targets = None if self.targets is None else self.targets[idx].to(self.device)
        return SyntheticBatch(images=self.images[idx].to(self.device), targets=targets)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.order, self.position = state["order"], state["position"]
