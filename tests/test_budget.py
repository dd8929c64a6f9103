"""A hard per-layer token budget keeps the cache bounded for an endless stream, evicting
the least important tokens and never the attention sinks."""

import pytest
import torch

from emloc import EMLoCSettings, PrunedCache, StreamContext
from emloc.budget import enforce_budget

from .reference import random_frames


@pytest.mark.slow
def test_budget_bounds_every_layer_over_50_chunks(model, tokenizer):
    budget = 48
    settings = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.3, 0.5, 1.0), chunk_frames=4,
                             token_budget=budget)
    context = StreamContext(model, tokenizer, settings)
    sinks = set(range(context.sink_tokens))
    evicted_total, sizes = 0, []
    for k in range(50):
        record = context.fold(random_frames(4, seed=k))
        for i, layer in enumerate(context.cache.layers):
            assert layer.length <= budget
            assert record.tokens_after[i] == record.tokens_before[i] + record.kept[i] - record.evicted[i]
            for h in range(layer.origins.shape[1]):
                assert sinks <= set(layer.committed_origins()[0, h].tolist()), "a sink token was evicted"
        evicted_total += sum(record.evicted)
        sizes.append(record.cache_bytes)
    assert evicted_total > 0, "the budget must have been reached"
    assert sizes[-1] == sizes[-10], "cache bytes stay flat once the budget is reached"
    assert all(length == budget for length in context.cache.lengths())


def test_eviction_keeps_highest_importance_and_sinks():
    cache = PrunedCache(1)
    layer = cache.layers[0]
    n, heads = 10, 2
    layer.update(torch.randn(1, heads, n, 4), torch.randn(1, heads, n, 4))
    importance = torch.tensor([[[0.0, 0.0, 5, 1, 9, 2, 8, 3, 7, 4], [0.0, 0.0, 1, 9, 2, 8, 3, 7, 4, 5]]])
    layer.commit_tail(torch.arange(n).view(1, 1, -1).expand(1, heads, -1), importance)
    keys_before = layer.keys.clone()
    evicted = enforce_budget(cache, budget=5, sink_tokens=2)
    assert evicted == [5]
    assert layer.committed_origins().tolist() == [[[0, 1, 4, 6, 8], [0, 1, 3, 5, 7]]]
    assert torch.equal(layer.keys[0, 0], keys_before[0, 0, [0, 1, 4, 6, 8]])
    assert torch.equal(layer.keys[0, 1], keys_before[0, 1, [0, 1, 3, 5, 7]])
