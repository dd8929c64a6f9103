"""One interface for every retention policy: given the chunk being folded, say which
of its tokens each layer keeps. EMLoC's JS-bounded search is one policy; the
fidelity benchmark's baselines are others, and they share one test."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..adapters import ModelAdapter
from ..cache import PrunedCache
from ..copies import ChunkView
from ..observer import ObserverPass, js_divergence, rerun_log_probs, rerun_together


@dataclass(frozen=True)
class GroupDecision:
    """The retention chosen for layers first..last (inclusive) of one chunk.

    tried: (ratio, js) for every candidate evaluated, in order.
    """

    first: int
    last: int
    ratio: float
    kept: int
    js: float
    tried: tuple[tuple[float, float], ...] = ()


@dataclass
class Retention:
    """keep[l]: (1, kv_heads, k) ascending chunk-token indices layer l keeps, or None for all."""

    keep: list[torch.Tensor | None]
    groups: list[GroupDecision] = field(default_factory=list)


class FoldState:
    """What a policy sees of one chunk while it is folded.

    importance[l]: (1, kv_heads, chunk_len) the scorer's importance of each chunk token.
    token_steps: (chunk_len,) temporal step (frame pair) of each chunk token, from 0.
    merge_keys[l]: (1, kv_heads, chunk_len, head_dim) unit keys (RoPE undone) by which dropped
        tokens are merged into the kept token most like them, or None (no merging).
    `apply` puts a selection into the cache's tails; `divergence` re-runs every observer
    from a layer against the tails as they stand and returns the largest JS; `divergences` does
    it for several candidate selections of one layer group in a single pass (`batched`: the
    attention implementation takes the copies' masks; flash attention does not).
    evaluations: candidate selections evaluated; passes: sequential re-runs made for them.
    """

    BATCHED_ATTENTION = ("sdpa", "eager")

    def __init__(self, adapter: ModelAdapter, cache: PrunedCache, chunk_keys: list[torch.Tensor],
                 chunk_values: list[torch.Tensor], importance: list[torch.Tensor],
                 token_steps: torch.Tensor, passes: list[ObserverPass],
                 merge_keys: list[torch.Tensor] | None = None) -> None:
        self.adapter, self.cache = adapter, cache
        self.chunk_keys, self.chunk_values = chunk_keys, chunk_values
        self.importance, self.token_steps, self.passes = importance, token_steps, passes
        self.merge_keys = merge_keys
        self.num_layers = adapter.num_layers
        self.chunk_len = chunk_keys[0].shape[2]
        self.evaluations = 0
        self.passes_run = 0
        self.batched = adapter.attention_implementation in self.BATCHED_ATTENTION

    def apply(self, selection: dict[int, torch.Tensor | None]) -> None:
        for layer, index in selection.items():
            keys, values = self.chunk_keys[layer], self.chunk_values[layer]
            log_mass = None
            if index is not None:
                keys = torch.gather(keys, 2, index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
                values = torch.gather(values, 2, index.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1]))
                if self.merge_keys is not None:
                    log_mass = merged_log_mass(self.merge_keys[layer], index)
            self.cache.layers[layer].set_tail(keys, values, log_mass)

    def divergence(self, start_layer: int) -> float:
        self.evaluations += 1
        self.passes_run += len(self.passes)
        return max(js_divergence(run.reference, rerun_log_probs(self.adapter, self.cache, run, start_layer))
                   for run in self.passes)

    def divergences(self, start_layer: int, selections: list[dict[int, torch.Tensor]]) -> list[float]:
        """The largest JS over the observers for each candidate selection of the layers it names
        (every selection names the same layers, from `start_layer` up; the layers above them hold
        what `apply` last put there). One pass: a copy of every observer per candidate, each seeing
        its candidate's tokens (with their merged log-mass) of the chunk at the searched layers."""
        layers = sorted(selections[0])
        self.apply({layer: None for layer in layers})  # the whole chunk in the tail; copies see their part
        views: dict[int, list[ChunkView]] = {layer: [] for layer in layers}
        for selection in selections:
            for layer in layers:
                view = self._view(layer, selection[layer])
                views[layer] += [view] * len(self.passes)
        runs = [run for _ in selections for run in self.passes]
        log_probs = rerun_together(self.adapter, self.cache, runs, start_layer, views)
        self.evaluations += len(selections)
        self.passes_run += 1
        per_run = [js_divergence(run.reference, lp) for run, lp in zip(runs, log_probs)]
        k = len(self.passes)
        return [max(per_run[i * k:(i + 1) * k]) for i in range(len(selections))]

    def _view(self, layer: int, index: torch.Tensor) -> ChunkView:
        """What a candidate keeping `index` (1, kv_heads, k) of layer `layer`'s chunk lets a copy see."""
        visible = torch.zeros(index.shape[:2] + (self.chunk_len,), dtype=torch.bool, device=index.device)
        visible.scatter_(-1, index, True)
        log_mass = None
        if self.merge_keys is not None:
            log_mass = torch.zeros(visible.shape, dtype=torch.float32, device=index.device)
            log_mass.scatter_(-1, index, merged_log_mass(self.merge_keys[layer], index))
        return ChunkView(visible, log_mass)


def merged_log_mass(unit_keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """StreamMem-like merging, as proportional attention: every dropped token is assigned to the
    kept token whose key is most like its own (cosine, per KV head); returns (1, kv_heads, k)
    log(1 + tokens assigned) for the kept tokens at `index` (1, kv_heads, k)."""
    kept = torch.gather(unit_keys, 2, index.unsqueeze(-1).expand(-1, -1, -1, unit_keys.shape[-1]))
    nearest = torch.matmul(unit_keys, kept.transpose(-1, -2)).argmax(dim=-1)  # (1, H, n): kept slot per token
    mass = torch.zeros(index.shape, dtype=torch.float32, device=index.device)
    mass.scatter_add_(-1, nearest, torch.ones(nearest.shape, dtype=torch.float32, device=index.device))
    return mass.clamp_min(1).log()  # a kept token is its own nearest (cos 1), so mass >= 1


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k highest scores per head of (1, kv_heads, n)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")


def kept_count(ratio: float, n: int) -> int:
    """Tokens a ratio keeps of n: at least one, at most all."""
    return min(n, max(1, math.ceil(ratio * n)))


class RetentionPolicy(ABC):
    """Chooses what each layer keeps of a chunk.

    needs_observers: False for policies that ignore observer attention; the fold then
        skips the observer pass (importance is zero).
    """

    needs_observers: bool = True

    @abstractmethod
    def retain(self, state: FoldState) -> Retention:
        """Choose each layer's kept chunk tokens."""

    def evict(self, cache: PrunedCache, sink_tokens: int) -> list[int]:
        """After a commit, drop committed tokens the policy no longer wants (tokens per layer)."""
        return [0] * len(cache.layers)
