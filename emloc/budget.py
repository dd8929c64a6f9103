"""A hard per-layer token budget: EMLoC keeps at least the smallest ratio of every
chunk, so an endless stream needs eviction to stay bounded (method.md, section 5)."""

from __future__ import annotations

import torch

from .cache import PrunedCache


def enforce_budget(cache: PrunedCache, budget: int, sink_tokens: int, by: str = "importance") -> list[int]:
    """Evicts, per layer and KV head, committed tokens until the layer holds at most `budget`:
    the lowest-importance ones (by="importance") or the oldest (by="recency"). Tokens whose
    stream index is below `sink_tokens` (the attention sinks, and a task pack's examples) are
    never evicted.
    Returns tokens evicted per layer."""
    if by not in ("importance", "recency"):
        raise ValueError(f"evict by 'importance' or 'recency', not {by!r}")
    protected = max((int((layer.committed_origins() < sink_tokens).sum(-1).max()) for layer in cache.layers
                     if layer.is_initialized), default=0)
    if protected > budget:
        raise ValueError(f"a budget of {budget} tokens cannot hold the {protected} tokens that are never evicted "
                         f"(the preamble and any task pack)")
    evicted = []
    for layer in cache.layers:
        excess = layer.length - budget
        if excess <= 0:
            evicted.append(0)
            continue
        origins = layer.committed_origins()
        scores = (layer.committed_importance() if by == "importance" else origins.float()).clone()
        scores[origins < sink_tokens] = torch.inf
        keep = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
        layer.keep_committed(keep)
        evicted.append(excess)
    return evicted
