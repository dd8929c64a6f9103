"""A hard per-layer token budget: EMLoC keeps at least the smallest ratio of every
chunk, so an endless stream needs eviction to stay bounded (method.md, section 5)."""

from __future__ import annotations

import torch

from .cache import PrunedCache


def enforce_budget(cache: PrunedCache, budget: int, sink_tokens: int) -> list[int]:
    """Evicts, per layer and KV head, the lowest-importance committed tokens until the
    layer holds at most `budget`; tokens whose stream index is below `sink_tokens`
    (the attention sinks) are never evicted. Returns tokens evicted per layer."""
    if sink_tokens > budget:
        raise ValueError(f"a budget of {budget} tokens cannot hold the {sink_tokens} sink tokens")
    evicted = []
    for layer in cache.layers:
        excess = layer.length - budget
        if excess <= 0:
            evicted.append(0)
            continue
        scores = layer.committed_importance().clone()
        scores[layer.committed_origins() < sink_tokens] = torch.inf
        keep = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
        layer.keep_committed(keep)
        evicted.append(excess)
    return evicted
