"""Replay buffers of synthetic images, kept as tensors (never PNG files), in memory or on disk.

`ReplayBuffer` holds at most `capacity` images in one tensor (fifo or reservoir replacement);
`DiskReplayBuffer` applies the same policies to images that live in shard files on disk, so a bank
of ImageNet size does not grow the process's memory (`build_replay_buffer` picks one from a
config). `PriorityReplayBuffer` adds proportional prioritised sampling (SSD-KD).

Storage dtypes (`REPLAY_DTYPES`): float16 halves float32 and keeps about 3 decimal digits, enough for
standardised images; uint8 quarters float32 and is exactly the 8-bit quantisation of the reference
code's PNG pool (zju-vipa `ImagePool`, implementations.md 1.1): images in `value_range` (default
[0, 1], a sigmoid generator's pixels) are stored as round(255 (x - lo) / (hi - lo)), values outside
the range are clipped; float32 keeps images bit for bit.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError

if TYPE_CHECKING:
    from .base import SynthesisContext

#: Storage dtypes by config name (`replay_dtype`).
REPLAY_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


class ReplayBuffer:
    """A bank of at most `capacity` images with `fifo` or `reservoir` replacement.

    Images are stored in `dtype` (torch.float16 by default; torch.uint8 quantises `value_range` to
    256 levels, see the module docstring) on `device`. Sampling is uniform with replacement from a
    caller-provided torch.Generator, so a rank's draws are reproducible and resumable. The policies
    decide which slots a batch overwrites; `_write` and `_read` store and fetch slots, which is all
    a subclass with another storage (DiskReplayBuffer) replaces.
    """

    storage = "memory"

    def __init__(self, capacity: int, policy: Literal["fifo", "reservoir"] = "fifo",
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 value_range: Sequence[float] = (0.0, 1.0)) -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        if policy not in ("fifo", "reservoir"):
            raise ValueError(f"replay policy must be 'fifo' or 'reservoir', got {policy!r}")
        if dtype not in REPLAY_DTYPES.values():
            raise ValueError(f"replay dtype must be one of {list(REPLAY_DTYPES)}, got {dtype}")
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ValueError(f"replay value_range must be (low, high) with high > low, got {tuple(value_range)}")
        self.capacity, self.policy, self.dtype, self.device = capacity, policy, dtype, torch.device(device)
        self.value_range = (low, high)
        self.images: Optional[Tensor] = None
        self.size = 0          # filled slots
        self.seen = 0          # images ever offered (reservoir sampling needs it)
        self._next = 0         # FIFO write position

    def __len__(self) -> int:
        return self.size

    # ---- encoding: what is stored for an image ---------------------------------------------------
    def _encode(self, images: Tensor) -> Tensor:
        if self.dtype == torch.uint8:
            low, high = self.value_range
            scaled = (images.float() - low) * (255.0 / (high - low))
            return scaled.round_().clamp_(0, 255).to(torch.uint8)
        return images.to(self.dtype)

    def _decode(self, stored: Tensor) -> Tensor:
        if self.dtype == torch.uint8:
            low, high = self.value_range
            return stored.float() * ((high - low) / 255.0) + low
        return stored.float()

    # ---- storage: overridden by DiskReplayBuffer -------------------------------------------------
    def _write(self, slots: Tensor, images: Tensor) -> None:
        """Store `images` (already detached) at `slots` (unique, CPU long)."""
        images = self._encode(images.to(self.device))
        if self.images is None:
            self.images = torch.empty((self.capacity, *images.shape[1:]), dtype=self.dtype, device=self.device)
        self.images[slots.to(self.device)] = images

    def _read(self, slots: Tensor) -> Tensor:
        """The images at `slots` as float32 on `device`."""
        return self._decode(self.images[slots.to(self.device)])

    # ---- policies ------------------------------------------------------------------------------
    def add(self, images: Tensor, rng: Optional[torch.Generator] = None) -> None:
        images = images.detach()
        n = images.shape[0]
        if self.policy == "fifo":
            if n > self.capacity:  # only the newest `capacity` images can survive this call
                self.seen += n - self.capacity
                self._next = (self._next + n - self.capacity) % self.capacity
                images, n = images[-self.capacity:], self.capacity
            slots = (self._next + torch.arange(n)) % self.capacity
            self._write(slots, images)
            self._next = (self._next + n) % self.capacity
        else:
            # Reservoir sampling (Vitter's algorithm R): the i-th image of the stream fills a free slot,
            # or replaces slot j ~ U{0..i} if j < capacity, so every image seen is kept with equal
            # probability. One random draw for the whole batch; assignments applied in stream order,
            # so where one call assigns a slot twice the later image wins.
            stream_index = self.seen + torch.arange(n, dtype=torch.float64)
            u = torch.rand(n, generator=rng, dtype=torch.float64, device=rng.device if rng else "cpu").cpu()
            draws = torch.floor(u * (stream_index + 1)).long().tolist()
            chosen: dict[int, int] = {}
            for i, j in enumerate(draws):
                slot = self.seen + i if self.seen + i < self.capacity else j
                if slot < self.capacity:
                    chosen[slot] = i
            if chosen:
                self._write(torch.tensor(list(chosen.keys())), images[torch.tensor(list(chosen.values()))])
        self.seen += n
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.size == 0:
            raise RuntimeError("sampling from an empty replay buffer: synthesize before reading it")
        idx = torch.randint(0, self.size, (n,), generator=rng, device=rng.device).to(self.device)
        return self._read(idx), idx

    def state_dict(self) -> dict[str, Any]:
        images = None if self.images is None else self.images[: self.size].clone()
        return {"images": images, "size": self.size, "seen": self.seen, "next": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("storage", "memory") != self.storage:
            raise ValueError(f"this replay state was saved by a {state.get('storage', 'memory')!r} bank and cannot "
                             f"be loaded into a {self.storage!r} one: resume with the same replay_storage")
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


# ---------------------------------------------------------------------------------------------------
# Disk-backed storage


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header of a C-ordered .npy file of this dtype and shape (padded by numpy to 64 bytes)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buffer.getvalue()


class DiskReplayBuffer(ReplayBuffer):
    """A ReplayBuffer (same fifo / reservoir policies, same draws) whose images live on disk.

    Layout: `directory/shard_000000.npy, shard_000001.npy, ...`, each a plain .npy array of
    `shard_size` images in the storage dtype (uint8 by default, see the module docstring), so a shard
    can be inspected with `np.load(path, mmap_mode="r")`. Give each rank its own directory
    (`build_replay_buffer` appends `rank_<r>`). In memory there is only an index: one int64 per slot
    (`slot_records`, slot -> record number), so the process's memory stays flat however large the
    bank grows; the operating system's page cache keeps the hot shards in RAM when there is room. Images
    are read and written with positional file I/O (os.pread / os.pwrite) rather than kept memory-mapped:
    mapped pages count in the process's resident set, so a uniformly sampled bank would show up as
    RSS growing to the bank's size.

    Records are append-only: image number k ever written goes to record k (shard k // shard_size, row
    k % shard_size), and a policy that overwrites a slot points the slot to a new record instead of
    writing over the old one. That is what makes resume safe:
      * `state_dict()` first fsyncs every shard written since the last call, then returns the index
        (slot -> record) and `written`, the number of records; a checkpoint therefore references only
        complete, durable records.
      * Records below `written` are never written again, so nothing done after a checkpoint (a new
        round, a write torn by a kill) can change what the checkpoint references. A resumed run
        continues appending at `written`, over whatever a killed run had left there; those rows were
        never part of any index it reads.
      * A shard file is created under a temporary name and renamed into place, so it is either absent
        or has a complete header. `load_state_dict` checks that every shard the index references exists
        with the expected header and size, and raises a clear error otherwise (no garbage is read).
      * Shards that no slot references any more (fifo / reservoir replaced all their images) are deleted
        after each `add`, except those referenced by the last `keep_snapshots` state_dicts, so the
        checkpoints still on disk (the Distiller keeps `save_total_limit`, default 2) stay loadable; a
        resumed run protects the snapshot it loaded. Disk use is therefore the live bank plus the images
        replaced since the oldest protected snapshot (an unbounded pool never deletes anything).
    A fresh buffer on a directory that holds an older run's shards starts over at record 0, replacing
    them as it goes; load a state first to continue instead.
    """

    storage = "disk"

    def __init__(self, capacity: int, directory: str | Path, policy: Literal["fifo", "reservoir"] = "fifo",
                 dtype: torch.dtype = torch.uint8, device: torch.device | str = "cpu",
                 value_range: Sequence[float] = (0.0, 1.0), shard_size: int = 4096, keep_snapshots: int = 3) -> None:
        super().__init__(capacity, policy, dtype, device, value_range)
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be >= 1, got {keep_snapshots}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.slot_records = torch.full((capacity,), -1, dtype=torch.int64)   # slot -> record, -1 empty
        self.written = 0                                                     # records appended so far
        self.item_shape: Optional[tuple[int, ...]] = None
        self._np_dtype = np.dtype(str(dtype).replace("torch.", ""))
        self._files: OrderedDict[int, int] = OrderedDict()   # shard -> open file descriptor (LRU)
        self._max_open = 64
        self._unsynced: set[int] = set()
        self._snapshots: deque[frozenset[int]] = deque(maxlen=keep_snapshots)

    # ---- files -----------------------------------------------------------------------------------
    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard_{shard:06d}.npy"

    @property
    def _item_bytes(self) -> int:
        return int(np.prod(self.item_shape)) * self._np_dtype.itemsize

    @property
    def _header(self) -> bytes:
        return _npy_header(self._np_dtype, (self.shard_size, *self.item_shape))

    def _close(self, shard: int) -> None:
        fd = self._files.pop(shard, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close the open shard files (they are reopened on demand)."""
        for shard in list(self._files):
            self._close(shard)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _fd(self, shard: int) -> int:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        fd = os.open(self.shard_path(shard), os.O_RDWR)
        self._files[shard] = fd
        while len(self._files) > self._max_open:
            oldest = next(iter(self._files))
            if oldest in self._unsynced:
                os.fsync(self._files[oldest])
                self._unsynced.discard(oldest)
            self._close(oldest)
        return fd

    def _create_shard(self, shard: int) -> None:
        """A new, zero-filled shard with a complete header, renamed into place (a crash leaves either
        no file or a whole one; the rows are filled by later writes)."""
        self._close(shard)
        path = self.shard_path(shard)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        header = self._header
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.truncate(len(header) + self.shard_size * self._item_bytes)  # sparse: no disk used yet
        os.replace(tmp, path)

    def _sync(self) -> None:
        for shard in sorted(self._unsynced):
            os.fsync(self._fd(shard))
        self._unsynced.clear()
        if hasattr(os, "O_DIRECTORY"):  # make created and deleted shard names durable too
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # ---- storage ---------------------------------------------------------------------------------
    def _write(self, slots: Tensor, images: Tensor) -> None:
        encoded = self._encode(images.cpu()).contiguous()
        shape = tuple(encoded.shape[1:])
        if self.item_shape is None:
            self.item_shape = shape
        elif shape != self.item_shape:
            raise ValueError(f"replay images have shape {shape}, the bank holds {self.item_shape}")
        rows = encoded.numpy()
        first, n = self.written, rows.shape[0]
        header_len = len(self._header)
        start = 0
        while start < n:  # one contiguous pwrite per shard touched
            record = first + start
            shard, row = divmod(record, self.shard_size)
            count = min(n - start, self.shard_size - row)
            if row == 0 or not self.shard_path(shard).exists():
                self._create_shard(shard)
            chunk = rows[start:start + count].tobytes()
            os.pwrite(self._fd(shard), chunk, header_len + row * self._item_bytes)
            self._unsynced.add(shard)
            start += count
        self.written += n
        self.slot_records[slots.cpu()] = torch.arange(first, first + n, dtype=torch.int64)
        self._collect_garbage()

    def _read(self, slots: Tensor) -> Tensor:
        records = self.slot_records[slots.cpu()].tolist()
        item, header_len = self._item_bytes, len(self._header)
        out = bytearray(item * len(records))
        for i, record in enumerate(records):
            shard, row = divmod(record, self.shard_size)
            data = os.pread(self._fd(shard), item, header_len + row * item)
            if len(data) != item:
                raise RuntimeError(f"replay shard {self.shard_path(shard)} is shorter than its header says: "
                                   "the bank on disk was modified or truncated outside this run")
            out[i * item:(i + 1) * item] = data
        stored = torch.frombuffer(out, dtype=self.dtype).view(len(records), *self.item_shape)
        return self._decode(stored).to(self.device)

    def _live_shards(self) -> set[int]:
        records = self.slot_records[self.slot_records >= 0]
        return set(torch.unique(records // self.shard_size).tolist())

    def _collect_garbage(self) -> None:
        keep = self._live_shards().union(*self._snapshots)
        keep.add(self.written // self.shard_size)            # the shard the next image goes to
        if self.written:
            keep.add((self.written - 1) // self.shard_size)
        for path in self.directory.glob("shard_*.npy"):
            shard = int(path.stem.split("_")[1])
            if shard not in keep:
                self._close(shard)
                self._unsynced.discard(shard)
                path.unlink(missing_ok=True)

    def disk_bytes(self) -> int:
        """Bytes the shards hold on disk (allocated blocks; sparse tails do not count)."""
        return sum(p.stat().st_blocks * 512 for p in self.directory.glob("shard_*.npy"))

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The index only (the images stay on disk). Makes every record it references durable first,
        and protects their shards from deletion for the next `keep_snapshots - 1` state_dicts."""
        self._sync()
        self._snapshots.append(frozenset(self._live_shards()))
        return {"storage": self.storage, "slot_records": self.slot_records.clone(), "written": self.written,
                "size": self.size, "seen": self.seen, "next": self._next, "shard_size": self.shard_size,
                "dtype": str(self.dtype), "value_range": list(self.value_range),
                "item_shape": None if self.item_shape is None else list(self.item_shape)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("storage", "memory") != self.storage:
            raise ValueError(f"this replay state was saved by a {state.get('storage', 'memory')!r} bank and cannot "
                             f"be loaded into a {self.storage!r} one: resume with the same replay_storage")
        for key, mine in (("shard_size", self.shard_size), ("dtype", str(self.dtype))):
            if state[key] != mine:
                raise ValueError(f"replay state has {key}={state[key]}, this bank {mine}: "
                                 "resume with the same settings")
        if tuple(state["slot_records"].shape) != (self.capacity,):
            raise ValueError(f"replay state has capacity {state['slot_records'].shape[0]}, this bank {self.capacity}")
        self.close()
        self._unsynced.clear()
        self.slot_records = state["slot_records"].to("cpu", torch.int64).clone()
        self.written, self.size, self.seen, self._next = state["written"], state["size"], state["seen"], state["next"]
        self.value_range = tuple(state["value_range"])
        self.item_shape = None if state["item_shape"] is None else tuple(state["item_shape"])
        shards = self._live_shards()
        if shards and self.item_shape is not None:
            expected_header, expected_size = self._header, len(self._header) + self.shard_size * self._item_bytes
            for shard in sorted(shards):
                path = self.shard_path(shard)
                problem = None
                if not path.is_file():
                    problem = "is missing"
                elif path.stat().st_size != expected_size:
                    problem = f"has {path.stat().st_size} bytes, expected {expected_size}"
                else:
                    with open(path, "rb") as fh:
                        if fh.read(len(expected_header)) != expected_header:
                            problem = "has a different dtype or image shape"
                if problem:
                    raise RuntimeError(
                        f"replay shard {path} {problem}: the disk-backed bank of this checkpoint lives in "
                        f"{self.directory} and must be kept next to it (resume with the same output_dir/replay_dir; "
                        "a checkpoint older than the last keep_snapshots saves may have lost replaced shards)")
        self._snapshots.append(frozenset(shards))


def build_replay_buffer(capacity: int, *, policy: Literal["fifo", "reservoir"] = "fifo",
                        storage: Literal["memory", "disk"] = "memory", directory: Optional[str | Path] = None,
                        dtype: str | torch.dtype = "float16", device: torch.device | str = "cpu",
                        value_range: Sequence[float] = (0.0, 1.0), process_index: int = 0,
                        shard_size: int = 4096) -> ReplayBuffer:
    """A ReplayBuffer from config values: `storage` "memory" (one tensor on `device`) or "disk" (shards
    under `directory/rank_<process_index>`, one folder per rank), `dtype` a REPLAY_DTYPES name."""
    if isinstance(dtype, str):
        if dtype not in REPLAY_DTYPES:
            raise ValueError(f"replay dtype must be one of {list(REPLAY_DTYPES)}, got {dtype!r}")
        dtype = REPLAY_DTYPES[dtype]
    if storage == "memory":
        return ReplayBuffer(capacity, policy, dtype=dtype, device=device, value_range=value_range)
    if storage != "disk":
        raise ValueError(f"replay storage must be 'memory' or 'disk', got {storage!r}")
    if directory is None:
        raise ValueError("replay_storage=disk needs a directory for the shards: set replay_dir (or run under the "
                         "Distiller, which uses OUTPUT_DIR/replay)")
    return DiskReplayBuffer(capacity, Path(directory) / f"rank_{process_index}", policy, dtype=dtype, device=device,
                            value_range=value_range, shard_size=shard_size)


@dataclass
class ReplayStorageConfig:
    """Recipe keys of a method whose pool grows with every round (CMI, DeepInversion, FastDFKD): where
    the pool lives and in which dtype. A dataclass mixin: `class XConfig(ReplayStorageConfig, MethodConfig)`;
    a method may override the `replay_dtype` default."""

    # "memory" (one tensor on the device) or "disk" (shards under replay_dir/rank_<r>; None:
    # OUTPUT_DIR/replay), for pools too large for memory (ImageNet-scale runs).
    replay_storage: Literal["memory", "disk"] = "memory"
    replay_dir: Optional[str] = None
    # float16: about 3 decimal digits, enough for images; uint8: the reference's 8-bit PNG quantisation
    # of a known value range; float32: bit for bit (module docstring).
    replay_dtype: Literal["uint8", "float16", "float32"] = "float16"

    def validate_replay_storage(self) -> None:
        if self.replay_storage not in ("memory", "disk"):
            raise ConfigError(f"replay_storage must be 'memory' or 'disk', got {self.replay_storage!r}")
        if self.replay_dtype not in REPLAY_DTYPES:
            raise ConfigError(f"replay_dtype must be one of {list(REPLAY_DTYPES)}, got {self.replay_dtype!r}")

    def build_pool(self, capacity: int, context: "SynthesisContext", *, value_range: Sequence[float] = (0.0, 1.0),
                   policy: Literal["fifo", "reservoir"] = "fifo") -> ReplayBuffer:
        """This rank's pool as configured, on the context's device; a disk pool without replay_dir goes to
        OUTPUT_DIR/replay/rank_<r> (the context's output_dir)."""
        directory = self.replay_dir
        if directory is None and context.output_dir is not None:
            directory = str(Path(context.output_dir) / "replay")
        try:
            return build_replay_buffer(capacity, policy=policy, storage=self.replay_storage, directory=directory,
                                       dtype=self.replay_dtype, device=context.device, value_range=value_range,
                                       process_index=context.process_index)
        except ValueError as err:
            raise ConfigError(str(err)) from None
