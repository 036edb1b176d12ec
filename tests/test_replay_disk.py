"""DiskReplayBuffer: the fifo / reservoir policies on shard files, same draws as the in-memory buffer,
no image tensor held in memory, uint8 quantisation, state round trip, garbage collection of replaced
shards, and a resume after a process killed in the middle of a shard write."""

import copy
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from accelerate_dfkd.synthesis import DiskReplayBuffer, ReplayBuffer, ReplaySource, build_replay_buffer

from .conftest import REPO, cli_env


def _batches(count, n=8, shape=(3, 4, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, *shape, generator=gen) for _ in range(count)]


def _all_slots(buf):
    return buf._read(torch.arange(len(buf)))


@pytest.mark.parametrize("policy", ["fifo", "reservoir"])
def test_disk_buffer_matches_the_memory_buffer_slot_for_slot(tmp_path, policy):
    memory = ReplayBuffer(20, policy, dtype=torch.float32)
    disk = DiskReplayBuffer(20, tmp_path, policy, dtype=torch.float32, shard_size=7)
    rng_m, rng_d = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for batch in _batches(9, n=6) + [torch.rand(25, 3, 4, 4)]:   # wraps, and one batch larger than capacity
        memory.add(batch, rng=rng_m)
        disk.add(batch, rng=rng_d)
        assert (len(memory), memory.seen) == (len(disk), disk.seen)
        assert torch.equal(memory.images[: len(memory)], _all_slots(disk))
    a, ia = memory.sample(16, torch.Generator().manual_seed(5))
    b, ib = disk.sample(16, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(ia, ib)
    # the files are plain .npy arrays of the shard's images
    first = np.load(tmp_path / f"shard_{disk.slot_records[0].item() // 7:06d}.npy", mmap_mode="r")
    assert first.shape == (7, 3, 4, 4) and first.dtype == np.float32


def test_no_image_tensor_is_held_in_memory(tmp_path):
    """However many images are added, the buffer's own tensors are its index (8 bytes per slot)."""
    capacity = 4096
    buf = DiskReplayBuffer(capacity, tmp_path, dtype=torch.float16, shard_size=512)
    for batch in _batches(40, n=100, shape=(3, 16, 16)):
        buf.add(batch)
    image_bytes = 4000 * 3 * 16 * 16 * 2
    held = sum(v.numel() * v.element_size() for v in vars(buf).values() if isinstance(v, torch.Tensor))
    assert buf.images is None and held == capacity * 8 and held < image_bytes / 50
    assert buf.disk_bytes() >= image_bytes
    assert len(buf._files) <= buf._max_open


def test_uint8_storage_quantises_the_value_range(tmp_path):
    images = torch.tensor([-0.5, 0.0, 0.2, 0.5, 1.0, 1.7]).view(6, 1, 1, 1)
    for buf in (DiskReplayBuffer(8, tmp_path, dtype=torch.uint8), ReplayBuffer(8, dtype=torch.uint8)):
        buf.add(images)
        back = buf._read(torch.arange(6)).view(-1)
        assert torch.allclose(back, images.view(-1).clamp(0, 1), atol=0.5 / 255 + 1e-7)
        assert back[1] == 0 and back[4] == 1
    ranged = DiskReplayBuffer(4, tmp_path / "ranged", dtype=torch.uint8, value_range=(-2.0, 2.0))
    ranged.add(torch.tensor([-2.0, 0.0, 2.0]).view(3, 1, 1, 1))
    assert torch.allclose(_all_slots(ranged).view(-1), torch.tensor([-2.0, 0.0, 2.0]), atol=2 / 255 + 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        DiskReplayBuffer(4, tmp_path / "bad", dtype=torch.int32)


def test_state_round_trip_and_sources(tmp_path):
    buf = DiskReplayBuffer(32, tmp_path, dtype=torch.float16, shard_size=10)
    for batch in _batches(7, n=6):
        buf.add(batch)
    state = copy.deepcopy(buf.state_dict())
    assert "images" not in state and state["written"] == 42 and state["storage"] == "disk"
    clone = DiskReplayBuffer(32, tmp_path, dtype=torch.float16, shard_size=10)
    clone.load_state_dict(state)
    assert torch.equal(_all_slots(clone), _all_slots(buf))
    a = ReplaySource(buf, 5, torch.Generator().manual_seed(3))
    b = ReplaySource(clone, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a.next_batch().images, b.next_batch().images)
    # Both continue identically (the clone appends where the original did).
    extra = torch.rand(9, 3, 4, 4)
    buf.add(extra), clone.add(extra)
    assert torch.equal(_all_slots(clone), _all_slots(buf))
    with pytest.raises(ValueError, match="replay_storage"):
        ReplayBuffer(32).load_state_dict(state)
    with pytest.raises(ValueError, match="replay_storage"):
        clone.load_state_dict(ReplayBuffer(32).state_dict())
    with pytest.raises(ValueError, match="shard_size"):
        DiskReplayBuffer(32, tmp_path, dtype=torch.float16, shard_size=11).load_state_dict(state)


def test_replaced_shards_are_deleted_but_recent_snapshots_stay_loadable(tmp_path):
    buf = DiskReplayBuffer(16, tmp_path, dtype=torch.float32, shard_size=8, keep_snapshots=2)
    batches = _batches(30, n=8)
    for batch in batches[:4]:
        buf.add(batch)
    old_state = copy.deepcopy(buf.state_dict())
    old_images = _all_slots(buf)
    for batch in batches[4:]:
        buf.add(batch)
    # FIFO of 16 in shards of 8: the 2 live shards, the protected snapshot's 2, and nothing else
    assert len(list(tmp_path.glob("shard_*.npy"))) == 4
    restored = DiskReplayBuffer(16, tmp_path, dtype=torch.float32, shard_size=8)
    restored.load_state_dict(old_state)
    assert torch.equal(_all_slots(restored), old_images)
    # once the snapshot ages out of keep_snapshots, its shards go, and loading it is a clear error
    buf.state_dict(), buf.state_dict(), buf.add(torch.rand(8, 3, 4, 4))
    assert len(list(tmp_path.glob("shard_*.npy"))) == 3
    with pytest.raises(RuntimeError, match="missing"):
        DiskReplayBuffer(16, tmp_path, dtype=torch.float32, shard_size=8).load_state_dict(old_state)


def test_build_replay_buffer_gives_each_rank_its_own_folder(tmp_path):
    assert type(build_replay_buffer(4)) is ReplayBuffer
    bufs = [build_replay_buffer(4, storage="disk", directory=tmp_path, dtype="uint8", process_index=r) for r in (0, 1)]
    for r, buf in enumerate(bufs):
        buf.add(torch.full((2, 1, 2, 2), float(r)))
    assert {p.parent.name for p in tmp_path.glob("*/shard_*.npy")} == {"rank_0", "rank_1"}
    assert _all_slots(bufs[1]).unique().tolist() == [1.0]
    with pytest.raises(ValueError, match="replay_dir"):
        build_replay_buffer(4, storage="disk")
    with pytest.raises(ValueError, match="dtype"):
        build_replay_buffer(4, dtype="int8")


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from accelerate_dfkd.synthesis import DiskReplayBuffer

    directory, checkpoint = sys.argv[1], sys.argv[2]
    buf = DiskReplayBuffer(24, directory, dtype=torch.float32, shard_size=8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        buf.add(torch.rand(8, 3, 4, 4, generator=gen))
    state = buf.state_dict()                       # what a checkpoint stores
    torch.save({"state": state, "images": buf._read(torch.arange(len(buf))), "rng": gen.get_state()}, checkpoint)
    buf.add(torch.rand(8, 3, 4, 4, generator=gen))  # a round after the checkpoint
    real_pwrite, calls = os.pwrite, [0]

    def torn_pwrite(fd, data, offset):              # the next write stops half-way: SIGKILL mid-write
        real_pwrite(fd, data[: len(data) // 2], offset)
        os.kill(os.getpid(), signal.SIGKILL)

    os.pwrite = torn_pwrite
    buf.add(torch.full((8, 3, 4, 4), 7.0))
    print("not reached")
""")


def test_resume_after_a_kill_in_the_middle_of_a_write_reads_no_garbage(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    directory, checkpoint = tmp_path / "bank", tmp_path / "ckpt.pt"
    proc = subprocess.run([sys.executable, str(script), str(directory), str(checkpoint)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = torch.load(checkpoint, weights_only=True)
    # The killed run had gone on writing: a whole round and half of the next one past the checkpoint.
    shards = lambda: sorted(int(p.stem.split("_")[1]) for p in directory.glob("shard_*.npy"))  # noqa: E731
    assert saved["state"]["written"] == 40 and shards() == [2, 3, 4, 5, 6]   # 6: created, then torn
    resumed = DiskReplayBuffer(24, directory, dtype=torch.float32, shard_size=8)
    resumed.load_state_dict(saved["state"])
    assert torch.equal(_all_slots(resumed), saved["images"])   # exactly the checkpoint's bank, no torn rows
    # It continues like an uninterrupted run from the checkpoint.
    gen = torch.Generator()
    gen.set_state(saved["rng"])
    reference = DiskReplayBuffer(24, tmp_path / "reference", dtype=torch.float32, shard_size=8)
    ref_gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        reference.add(torch.rand(8, 3, 4, 4, generator=ref_gen))
    for _ in range(3):
        batch = torch.rand(8, 3, 4, 4, generator=gen)
        resumed.add(batch), reference.add(batch)
        assert torch.equal(_all_slots(resumed), _all_slots(reference))
    # the checkpoint's shards (2-4) stay protected; 5 and 6 were rewritten from their first row, 7 is new
    assert shards() == [2, 3, 4, 5, 6, 7] and not list(directory.glob(".*tmp*"))
