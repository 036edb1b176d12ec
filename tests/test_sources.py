"""Sources (the read side) and replay buffers: reproducible, resumable, policy-exact."""

import copy

import pytest
import torch

from accelerate_dfkd.synthesis import DataLoaderSource, GeneratorSource, MixedSource, ReplayBuffer, ReplaySource


def _generator():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Unflatten(1, (2, 2, 2)))


def test_generator_source_is_an_iterable_dataset_with_resumable_state():
    gen = _generator()
    source = GeneratorSource(gen, nz=4, batch_size=5, rng=torch.Generator().manual_seed(1))
    assert isinstance(source, torch.utils.data.IterableDataset)
    it = iter(source)
    first = next(it)
    assert first.images.shape == (5, 2, 2, 2) and not first.images.requires_grad
    state = copy.deepcopy(source.state_dict())
    expected = next(it).images
    source.load_state_dict(state)
    assert torch.equal(next(iter(source)).images, expected)


def test_generator_source_works_in_a_dataloader_with_batch_size_none():
    source = GeneratorSource(_generator(), nz=4, batch_size=3, rng=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=0)
    assert next(iter(loader)).images.shape == (3, 2, 2, 2)


def test_fifo_buffer_keeps_the_newest():
    buf = ReplayBuffer(capacity=4, policy="fifo", dtype=torch.float32)
    buf.add(torch.arange(6, dtype=torch.float32).view(6, 1))
    assert len(buf) == 4
    assert sorted(buf.images.view(-1).tolist()) == [2.0, 3.0, 4.0, 5.0]


def test_reservoir_buffer_is_uniform_over_the_stream():
    counts = torch.zeros(40)
    rng = torch.Generator().manual_seed(0)
    for _ in range(300):
        buf = ReplayBuffer(capacity=10, policy="reservoir", dtype=torch.float32)
        buf.add(torch.arange(40, dtype=torch.float32).view(40, 1), rng=rng)
        counts[buf.images.view(-1).long()] += 1
    # each item kept with probability 10/40: 75 expected per item out of 300 trials
    assert counts.min() > 40 and counts.max() < 115, counts


def test_buffer_state_round_trip_and_float16_storage():
    buf = ReplayBuffer(capacity=8, policy="fifo")
    buf.add(torch.randn(5, 1, 2, 2))
    assert buf.images.dtype == torch.float16
    clone = ReplayBuffer(capacity=8, policy="fifo")
    clone.load_state_dict(copy.deepcopy(buf.state_dict()))
    assert torch.equal(clone.images[:5], buf.images[:5]) and len(clone) == 5
    source_a = ReplaySource(buf, 3, torch.Generator().manual_seed(2))
    source_b = ReplaySource(clone, 3, torch.Generator().manual_seed(2))
    assert torch.equal(source_a.next_batch().images, source_b.next_batch().images)
    with pytest.raises(RuntimeError, match="empty"):
        ReplaySource(ReplayBuffer(2), 1, torch.Generator()).next_batch()


def test_mixed_source_concatenates_and_fills_weights():
    a = GeneratorSource(_generator(), nz=4, batch_size=3, rng=torch.Generator().manual_seed(1))
    buf = ReplayBuffer(capacity=4, dtype=torch.float32)
    buf.add(torch.randn(4, 2, 2, 2))
    mixed = MixedSource([a, ReplaySource(buf, 2, torch.Generator().manual_seed(0))])
    batch = mixed.next_batch()
    assert batch.images.shape[0] == 5 and batch.weights is None
    state = copy.deepcopy(mixed.state_dict())
    expected = mixed.next_batch().images
    mixed.load_state_dict(state)
    assert torch.equal(mixed.next_batch().images, expected)


def test_dataloader_source_resumes_mid_epoch():
    images, targets = torch.arange(10.0).view(10, 1), torch.arange(10)
    src = DataLoaderSource(images, targets, batch_size=4, rng=torch.Generator().manual_seed(0))
    seen = [src.next_batch() for _ in range(2)]
    assert len(set(torch.cat([b.targets for b in seen]).tolist())) == 8  # no repeats within an epoch
    state = copy.deepcopy(src.state_dict())
    expected = [src.next_batch().images for _ in range(3)]
    src.load_state_dict(state)
    assert all(torch.equal(src.next_batch().images, e) for e in expected)
