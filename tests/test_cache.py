"""The cache layer: updates write after the tail, tails are tentative, growth keeps data."""

import pytest
import torch

from emloc import PrunedCache


def commit_all(layer, start=0):
    n = layer.tail
    layer.commit_tail(torch.arange(start, start + n).view(1, 1, -1).expand(1, layer._k.shape[1], -1),
                      torch.zeros(1, layer._k.shape[1], n))


def test_update_returns_committed_plus_tail_and_grows():
    cache = PrunedCache(2)
    layer = cache.layers[0]
    first = torch.randn(1, 2, 200, 8)
    keys, _ = cache.update(first, first + 1, 0)
    assert torch.equal(keys, first) and layer.get_seq_length() == 200 and layer.length == 0
    commit_all(layer)
    second = torch.randn(1, 2, 300, 8)  # beyond the initial capacity of 256
    keys, values = cache.update(second, second + 1, 0)
    assert torch.equal(keys, torch.cat([first, second], dim=2))
    assert torch.equal(values, torch.cat([first, second], dim=2) + 1)
    layer.drop_tail()
    assert torch.equal(layer.keys, first) and layer.get_seq_length() == 200
    assert cache.lengths() == [200, 0]
    assert cache.nbytes() == 200 * 2 * (8 * 4 * 2 + 8 + 4)
    assert cache.capacity_nbytes() >= cache.nbytes()


def test_set_tail_replaces_and_drop_tail_checks_bounds():
    cache = PrunedCache(1)
    layer = cache.layers[0]
    cache.update(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), 0)
    commit_all(layer)
    chunk = torch.randn(1, 1, 6, 4)
    cache.update(chunk, chunk, 0)
    layer.set_tail(chunk[:, :, [1, 4]], chunk[:, :, [1, 4]])
    assert layer.tail == 2 and torch.equal(layer.tail_keys(), chunk[:, :, [1, 4]])
    with pytest.raises(ValueError, match="cannot keep 3 of 2"):
        layer.drop_tail(3)
    with pytest.raises(ValueError, match="metadata for 2 tail tokens"):
        layer.commit_tail(torch.zeros(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, 3))
    commit_all(layer, start=5)
    assert layer.length == 7 and layer.committed_origins().tolist() == [[[0, 1, 2, 3, 4, 5, 6]]]


def test_one_sequence_per_cache():
    with pytest.raises(ValueError, match="one sequence"):
        PrunedCache(1).update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), 0)
