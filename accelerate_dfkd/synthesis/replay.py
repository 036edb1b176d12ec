"""Fixed-capacity replay buffers of synthetic images, kept as tensors (never PNG files)."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor


class ReplayBuffer:
    """A bank of at most `capacity` images with `fifo` or `reservoir` replacement.

    Images are stored in `dtype` (float16 halves the memory of float32 and keeps about 3 decimal
    digits, enough for standardised images) on `device`. Sampling is uniform with replacement from
    a caller-provided torch.Generator, so a rank's draws are reproducible and resumable.
    """

    def __init__(self, capacity: int, policy: Literal["fifo", "reservoir"] = "fifo",
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        if policy not in ("fifo", "reservoir"):
            raise ValueError(f"replay policy must be 'fifo' or 'reservoir', got {policy!r}")
        self.capacity, self.policy, self.dtype, self.device = capacity, policy, dtype, torch.device(device)
        self.images: Optional[Tensor] = None
        self.size = 0          # filled slots
        self.seen = 0          # images ever offered (reservoir sampling needs it)
        self._next = 0         # FIFO write position

    def __len__(self) -> int:
        return self.size

    def add(self, images: Tensor, rng: Optional[torch.Generator] = None) -> None:
        images = images.detach().to(self.device, self.dtype)
        if self.images is None:
            self.images = torch.empty((self.capacity, *images.shape[1:]), dtype=self.dtype, device=self.device)
        n = images.shape[0]
        if self.policy == "fifo":
            if n > self.capacity:  # only the newest `capacity` images can survive this call
                self.seen += n - self.capacity
                self._next = (self._next + n - self.capacity) % self.capacity
                images, n = images[-self.capacity:], self.capacity
            slots = (self._next + torch.arange(n)) % self.capacity
            self.images[slots.to(self.device)] = images
            self._next = (self._next + n) % self.capacity
        else:
            # Reservoir sampling (Vitter's algorithm R): the i-th image of the stream fills a free slot,
            # or replaces slot j ~ U{0..i} if j < capacity, so every image seen is kept with equal
            # probability. One random draw for the whole batch; assignments applied in stream order.
            stream_index = self.seen + torch.arange(n, dtype=torch.float64)
            u = torch.rand(n, generator=rng, dtype=torch.float64, device=rng.device if rng else "cpu").cpu()
            draws = torch.floor(u * (stream_index + 1)).long().tolist()
            for i, j in enumerate(draws):
                slot = self.seen + i if self.seen + i < self.capacity else j
                if slot < self.capacity:
                    self.images[slot] = images[i]
        self.seen += n
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.size == 0:
            raise RuntimeError("sampling from an empty replay buffer: synthesize before reading it")
        idx = torch.randint(0, self.size, (n,), generator=rng, device=rng.device).to(self.device)
        return self.images[idx].float(), idx

    def state_dict(self) -> dict[str, Any]:
        images = None if self.images is None else self.images[: self.size].clone()
        return {"images": images, "size": self.size, "seen": self.seen, "next": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size, self.seen, self._next = state["size"], state["seen"], state["next"]
        if state["images"] is None:
            self.images = None
            return
        stored = state["images"].to(self.device, self.dtype)
        self.images = torch.empty((self.capacity, *stored.shape[1:]), dtype=self.dtype, device=self.device)
        self.images[: self.size] = stored
