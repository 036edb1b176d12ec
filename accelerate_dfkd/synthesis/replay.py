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


class PriorityReplayBuffer:
    """A fixed-capacity bank with FIFO replacement and proportional prioritised sampling.

    This is the replay scheme of SSD-KD (Eq. 4-6: priority delta_i(x) = w_{i-1}(x) * KL(teacher || student),
    P_i(x) = (|delta_i(x)| + eps)^alpha / sum_x' (|delta_i(x')| + eps)^alpha, w_i(x) = (N * P_i(x))^(-beta)),
    which is the proportional variant of prioritised experience replay (Schaul et al., ICLR 2016, Sec. 3.3
    and 3.4). Weights are divided by their maximum over the stored entries (Schaul et al. Sec. 3.4: "we
    always normalize weights by 1/max_i w_i so that they only scale the update downwards"), i.e.
    w_i = (P_min / P_i)^beta, so a weight depends only on the entry, not on what else was drawn.

    Defaults: alpha 0.6 and beta 0.4 are Schaul et al.'s values for the proportional variant (their
    appendix hyper-parameter table, Atari; quoted from memory, the paper is not in shared/papers);
    SSD-KD names alpha, beta and eps but does not publish values, and releases no code (OSVAI/SSD-KD
    holds only a README). eps 1e-6 is a conventional "small positive constant" (also not published).
    Schaul et al. anneal beta linearly to 1 by the end of training: assign `buffer.beta` to do that.

    Replacement is FIFO: when full, each new image overwrites the oldest slot (SSD-KD's buffer keeps
    |B| constant and is "updated partially"). A new image gets the largest priority currently stored
    (1.0 in an empty buffer), so it is likely to be drawn soon (Schaul et al. Algorithm 1, line 6).

    Two flat array-based binary trees (root at 1, children of k at 2k and 2k+1, leaves at
    `leaf_offset + slot`) hold p_i^alpha: a sum tree for sampling by prefix-sum descent, and a min tree
    for the weight normaliser. Sampling and updates touch one node per level, O(log capacity) per item,
    vectorised over the batch. Parents are always recomputed from their children (never adjusted by
    deltas), so the trees are an exact function of the leaves: no drift, and a state round trip rebuilds
    them bit for bit. The trees live on the CPU in float64; images live in `dtype` on `device`.
    """

    policy = "priority"

    def __init__(self, capacity: int, alpha: float = 0.6, beta: float = 0.4, eps: float = 1e-6,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        if alpha < 0 or beta < 0 or eps < 0:
            raise ValueError(f"alpha, beta and eps must be non-negative, got {alpha}, {beta}, {eps}")
        self.capacity, self.dtype, self.device = capacity, dtype, torch.device(device)
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.images: Optional[Tensor] = None
        self.size = 0          # filled slots
        self.seen = 0          # images ever offered
        self._next = 0         # FIFO write position = the oldest slot once full
        self.depth = max(1, (capacity - 1).bit_length())      # ceil(log2(capacity)), at least 1
        self.leaf_offset = 1 << self.depth
        self.priorities = torch.zeros(capacity, dtype=torch.float64)   # p_i = |delta_i| + eps
        self._sum_tree = torch.zeros(2 * self.leaf_offset, dtype=torch.float64)
        self._min_tree = torch.full((2 * self.leaf_offset,), float("inf"), dtype=torch.float64)

    def __len__(self) -> int:
        return self.size

    # ---- trees -------------------------------------------------------------------------------
    @property
    def total(self) -> float:
        """sum_k p_k^alpha over the stored entries (the sum tree's root)."""
        return float(self._sum_tree[1])

    def _set_leaves(self, slots: Tensor, values: Tensor) -> None:
        """Write p^alpha at `slots` (unique, CPU long) and recompute their ancestors up to the root."""
        nodes = slots + self.leaf_offset
        self._sum_tree[nodes] = values
        # Zero-mass leaves (eps 0 and priority 0) are never drawn: keep them out of the normaliser.
        self._min_tree[nodes] = torch.where(values > 0, values, torch.full_like(values, float("inf")))
        for _ in range(self.depth):
            nodes = torch.unique(nodes // 2)
            self._sum_tree[nodes] = self._sum_tree[2 * nodes] + self._sum_tree[2 * nodes + 1]
            self._min_tree[nodes] = torch.minimum(self._min_tree[2 * nodes], self._min_tree[2 * nodes + 1])

    def _rebuild(self) -> None:
        self._sum_tree.zero_()
        self._min_tree.fill_(float("inf"))
        if self.size:
            self._set_leaves(torch.arange(self.size), self.priorities[: self.size] ** self.alpha)

    def _find(self, mass: Tensor) -> Tensor:
        """Prefix-sum descent: for each mass u in [0, total) the slot i with cumsum_{<i} <= u < cumsum_{<=i}."""
        node = torch.ones_like(mass, dtype=torch.long)
        for _ in range(self.depth):
            left = 2 * node
            left_mass = self._sum_tree[left]
            # Never step into an empty right subtree: guards u == total from float rounding.
            go_right = (mass >= left_mass) & (self._sum_tree[left + 1] > 0)
            mass = torch.where(go_right, mass - left_mass, mass)
            node = left + go_right.long()
        return (node - self.leaf_offset).clamp_(max=self.size - 1)

    def _clean(self, priorities: Tensor | Any, n: int) -> Tensor:
        if isinstance(priorities, torch.Generator):
            raise TypeError("PriorityReplayBuffer.add(images, priorities=None): the second argument is "
                            "priorities, not a generator (FIFO replacement draws nothing)")
        p = torch.as_tensor(priorities).detach().to("cpu", torch.float64).reshape(-1)
        if p.numel() != n:
            raise ValueError(f"expected {n} priorities, got {p.numel()}")
        if not torch.isfinite(p).all():
            raise ValueError("priorities must be finite")
        return p.abs() + self.eps

    # ---- public API --------------------------------------------------------------------------
    def max_priority(self) -> float:
        """The largest stored priority p_i (1.0 while empty): what a new entry receives."""
        return float(self.priorities[: self.size].max()) if self.size else 1.0

    def add(self, images: Tensor, priorities: Optional[Tensor] = None,
            rng: Optional[torch.Generator] = None) -> Tensor:
        """Store `images` (FIFO); `priorities` are raw |delta| (eps is added here), default: the current
        max priority. `rng` is accepted for drop-in use in place of ReplayBuffer and ignored. Returns the
        slots written (CPU long)."""
        images = images.detach().to(self.device, self.dtype)
        n = images.shape[0]
        p = (torch.full((n,), self.max_priority(), dtype=torch.float64) if priorities is None
             else self._clean(priorities, n))
        if self.images is None:
            self.images = torch.empty((self.capacity, *images.shape[1:]), dtype=self.dtype, device=self.device)
        if n > self.capacity:  # only the newest `capacity` images can survive this call
            self.seen += n - self.capacity
            self._next = (self._next + n - self.capacity) % self.capacity
            images, p, n = images[-self.capacity:], p[-self.capacity:], self.capacity
        slots = (self._next + torch.arange(n)) % self.capacity
        self.images[slots.to(self.device)] = images
        self.priorities[slots] = p
        self._next = (self._next + n) % self.capacity
        self.seen += n
        self.size = min(self.capacity, self.size + n)
        self._set_leaves(slots, p ** self.alpha)
        return slots

    def probabilities(self) -> Tensor:
        """P(i) for the stored entries (float64, CPU); for inspection and tests."""
        return (self.priorities[: self.size] ** self.alpha) / self.total

    def weights(self, idx: Tensor) -> Tensor:
        """Normalised importance-sampling weights w_i = (N P(i))^-beta / max_j (N P(j))^-beta (float32)."""
        idx = torch.as_tensor(idx).to("cpu", torch.long)
        p_alpha = self._sum_tree[idx + self.leaf_offset]
        p_min = self._min_tree[1]
        return ((p_min / p_alpha) ** self.beta).float().to(self.device)

    def sample(self, n: int, rng: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Draw n slots with replacement, P(i) proportional to p_i^alpha: one uniform per draw from `rng`.
        Returns (images as float32, slot indices, normalised IS weights), all on `device`."""
        if self.size == 0:
            raise RuntimeError("sampling from an empty replay buffer: synthesize before reading it")
        u = torch.rand(n, generator=rng, dtype=torch.float64, device=rng.device).cpu()
        idx = self._find(u * self._sum_tree[1])
        weights = self.weights(idx)
        idx = idx.to(self.device)
        return self.images[idx].float(), idx, weights

    def update_priorities(self, idx: Tensor, priorities: Tensor) -> None:
        """Set p_i = |priorities| + eps for the sampled slots. A slot repeated in `idx` (sampling is with
        replacement) takes its last value. The caller should update before the next `add`, which may
        overwrite sampled slots (SSD-KD Algorithm 1 adds once per round, then samples and updates)."""
        idx = torch.as_tensor(idx).to("cpu", torch.long).reshape(-1)
        p = self._clean(priorities, idx.numel())
        if idx.numel() == 0:
            return
        if bool((idx < 0).any()) or bool((idx >= self.size).any()):
            raise IndexError(f"priority update for slots outside the {self.size} filled ones")
        position = torch.arange(idx.numel())
        last = torch.full((self.capacity,), -1, dtype=torch.long).scatter_reduce(0, idx, position, "amax")
        keep = last[idx] == position
        idx, p = idx[keep], p[keep]
        self.priorities[idx] = p
        self._set_leaves(idx, p ** self.alpha)

    def state_dict(self) -> dict[str, Any]:
        images = None if self.images is None else self.images[: self.size].clone()
        return {"images": images, "priorities": self.priorities[: self.size].clone(), "size": self.size,
                "seen": self.seen, "next": self._next, "alpha": self.alpha, "beta": self.beta, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size, self.seen, self._next = state["size"], state["seen"], state["next"]
        self.alpha, self.beta, self.eps = state["alpha"], state["beta"], state["eps"]
        self.priorities.zero_()
        self.priorities[: self.size] = state["priorities"].to("cpu", torch.float64)
        if state["images"] is None:
            self.images = None
        else:
            stored = state["images"].to(self.device, self.dtype)
            self.images = torch.empty((self.capacity, *stored.shape[1:]), dtype=self.dtype, device=self.device)
            self.images[: self.size] = stored
        self._rebuild()
