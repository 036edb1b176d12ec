"""PriorityReplayBuffer and PrioritySource: proportional prioritised sampling (Schaul et al. 2016 /
SSD-KD Eq. 4-6), sum-tree invariants, FIFO replacement and resumable state."""

import copy
import math

import pytest
import torch

from accelerate_dfkd.synthesis import PriorityReplayBuffer, PrioritySource, SyntheticBatch


def _buffer(priorities, alpha=0.6, beta=0.4, eps=0.0, capacity=None):
    n = len(priorities)
    buf = PriorityReplayBuffer(capacity or n, alpha=alpha, beta=beta, eps=eps, dtype=torch.float32)
    buf.add(torch.arange(n, dtype=torch.float32).view(n, 1), torch.tensor(priorities, dtype=torch.float64))
    return buf


def _frequencies(buf, draws, seed=0):
    _, idx, _ = buf.sample(draws, torch.Generator().manual_seed(seed))
    return torch.bincount(idx, minlength=buf.capacity).double() / draws


def _leaf_sum(buf):
    return float((buf.priorities[: buf.size] ** buf.alpha).sum())


def test_sampling_frequencies_follow_priorities_to_the_alpha():
    priorities = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 9.0]
    buf = _buffer(priorities, alpha=0.6)
    expected = torch.tensor(priorities, dtype=torch.float64) ** 0.6
    expected /= expected.sum()
    freq = _frequencies(buf, 20000)
    assert torch.allclose(buf.probabilities(), expected)
    assert ((freq - expected).abs() / expected).max() < 0.1


def test_importance_weights_match_a_hand_computed_example():
    # N = 4, p = [1, 2, 3, 4], alpha 1: P = p / 10 = [0.1, 0.2, 0.3, 0.4].
    # beta 0.5: (N P)^-beta = [0.4, 0.8, 1.2, 1.6]^-0.5; the largest is 0.4^-0.5 (the rarest item), so
    # w = (0.4 / [0.4, 0.8, 1.2, 1.6])^0.5 = [1, sqrt(1/2), sqrt(1/3), 1/2].
    buf = _buffer([1.0, 2.0, 3.0, 4.0], alpha=1.0, beta=0.5, eps=0.0)
    assert torch.allclose(buf.probabilities(), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    hand = torch.tensor([1.0, math.sqrt(0.5), math.sqrt(1 / 3), 0.5])
    assert torch.allclose(buf.weights(torch.arange(4)), hand)
    _, idx, weights = buf.sample(64, torch.Generator().manual_seed(3))
    assert torch.allclose(weights, hand[idx])


def test_eps_keeps_zero_priorities_reachable():
    buf = _buffer([0.0, 1.0], alpha=1.0, eps=0.01)
    assert buf.probabilities()[0] > 0
    assert torch.allclose(buf.priorities[:2], torch.tensor([0.01, 1.01], dtype=torch.float64))


def test_update_priorities_changes_sampling():
    buf = _buffer([1.0] * 8, alpha=1.0)
    buf.update_priorities(torch.tensor([2, 5]), torch.tensor([10.0, 0.0]))
    freq = _frequencies(buf, 20000)
    expected = torch.tensor([1, 1, 10, 1, 1, 0, 1, 1], dtype=torch.float64) / 16
    assert freq[5] == 0
    _, _, weights = buf.sample(100, torch.Generator().manual_seed(1))      # zero-mass slot left out of max_j w_j
    assert torch.isfinite(weights).all() and weights.max() == 1.0
    assert abs(freq[2] - expected[2]) / expected[2] < 0.05
    # Repeated slots (sampling is with replacement): the last value wins.
    buf.update_priorities(torch.tensor([1, 1, 1]), torch.tensor([3.0, 4.0, 2.0]))
    assert buf.priorities[1] == 2.0
    assert math.isclose(buf.total, _leaf_sum(buf))


def test_sum_tree_total_tracks_adds_updates_and_overwrites():
    gen = torch.Generator().manual_seed(0)
    buf = PriorityReplayBuffer(capacity=13, alpha=0.7, eps=1e-3, dtype=torch.float32)
    for step in range(20):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        p = None if step % 3 == 0 else torch.rand(n, generator=gen) * 5
        buf.add(torch.randn(n, 2, generator=gen), p)
        assert math.isclose(buf.total, _leaf_sum(buf), rel_tol=1e-12)
        _, idx, _ = buf.sample(6, gen)
        buf.update_priorities(idx, torch.rand(6, generator=gen))
        assert math.isclose(buf.total, _leaf_sum(buf), rel_tol=1e-12)
        # Every internal node is the sum (min) of its children.
        tree, mins, k = buf._sum_tree, buf._min_tree, torch.arange(1, buf.leaf_offset)
        assert torch.equal(tree[k], tree[2 * k] + tree[2 * k + 1])
        assert torch.equal(mins[k], torch.minimum(mins[2 * k], mins[2 * k + 1]))
    assert len(buf) == 13


def test_fifo_overwrites_the_oldest_when_full():
    buf = PriorityReplayBuffer(capacity=4, dtype=torch.float32)
    buf.add(torch.arange(3, dtype=torch.float32).view(3, 1), torch.tensor([1.0, 2.0, 3.0]))
    buf.add(torch.tensor([[3.0], [4.0]]), torch.tensor([4.0, 5.0]))
    assert len(buf) == 4
    assert buf.images.view(-1).tolist() == [4.0, 1.0, 2.0, 3.0]       # slot 0 (oldest) replaced
    assert buf.priorities[0] == pytest.approx(5.0 + buf.eps)
    buf.add(torch.arange(10, 16, dtype=torch.float32).view(6, 1))      # more than capacity: newest 4 kept
    assert sorted(buf.images.view(-1).tolist()) == [12.0, 13.0, 14.0, 15.0]
    assert math.isclose(buf.total, _leaf_sum(buf))


def test_new_entries_get_the_current_max_priority():
    buf = PriorityReplayBuffer(capacity=8, alpha=1.0, eps=0.0, dtype=torch.float32)
    buf.add(torch.zeros(2, 1))
    assert buf.priorities[:2].tolist() == [1.0, 1.0]                    # empty buffer: 1.0
    buf.update_priorities(torch.tensor([0, 1]), torch.tensor([0.5, 7.0]))
    slots = buf.add(torch.ones(3, 1))
    assert buf.priorities[slots].tolist() == [7.0, 7.0, 7.0]


def test_state_round_trip_reproduces_the_next_sample():
    buf = _buffer([1.0, 2.0, 3.0, 4.0, 5.0], alpha=0.6, eps=1e-6, capacity=8)
    buf.update_priorities(torch.tensor([0]), torch.tensor([9.0]))
    rng = torch.Generator().manual_seed(7)
    state, rng_state = copy.deepcopy(buf.state_dict()), rng.get_state()
    expected = buf.sample(10, rng)
    fresh = PriorityReplayBuffer(capacity=8, dtype=torch.float32)
    fresh.load_state_dict(state)
    rng.set_state(rng_state)
    got = fresh.sample(10, rng)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert torch.equal(fresh._sum_tree, buf._sum_tree)
    fresh.add(torch.zeros(4, 1)), buf.add(torch.zeros(4, 1))            # write pointer restored too
    assert torch.equal(fresh.images, buf.images) and torch.equal(fresh.priorities, buf.priorities)


@pytest.mark.parametrize("capacity, depth", [(1, 1), (2, 1), (5, 3), (8, 3), (9, 4), (5000, 13)])
def test_tree_is_logarithmic(capacity, depth):
    # Sampling and updates visit one node per level: cost O(depth) = O(log capacity) per item.
    buf = PriorityReplayBuffer(capacity, dtype=torch.float32)
    assert buf.depth == depth == max(1, math.ceil(math.log2(capacity)))
    assert buf.leaf_offset >= capacity and buf._sum_tree.numel() == 2 * buf.leaf_offset < 4 * capacity + 2


def test_float16_storage_and_empty_errors():
    buf = PriorityReplayBuffer(capacity=4)
    with pytest.raises(RuntimeError):
        buf.sample(1, torch.Generator())
    buf.add(torch.full((2, 3), 1 / 3))
    images, idx, weights = buf.sample(5, torch.Generator().manual_seed(0))
    assert buf.images.dtype == torch.float16 and images.dtype == torch.float32 and weights.dtype == torch.float32
    with pytest.raises(IndexError):
        buf.update_priorities(torch.tensor([3]), torch.tensor([1.0]))
    with pytest.raises(TypeError):
        buf.add(torch.zeros(1, 3), torch.Generator())


def test_priority_source_yields_weights_and_indices_and_resumes():
    buf = _buffer([1.0, 2.0, 3.0, 4.0], alpha=1.0, beta=0.5)
    source = PrioritySource(buf, batch_size=6, rng=torch.Generator().manual_seed(1))
    assert isinstance(source, torch.utils.data.IterableDataset)
    batch = next(iter(source))
    assert isinstance(batch, SyntheticBatch) and batch.images.shape == (6, 1)
    assert torch.equal(batch.images.view(-1), batch.indices.float())
    assert torch.allclose(batch.weights, buf.weights(batch.indices))
    state = copy.deepcopy(source.state_dict())
    expected = source.next_batch()
    source.load_state_dict(state)
    again = source.next_batch()
    assert torch.equal(again.indices, expected.indices) and torch.equal(again.weights, expected.weights)
