"""StreamingLLM baseline: the attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import enforce_budget
from ..cache import PrunedCache
from .base import FoldState, GroupDecision, Retention, RetentionPolicy


@dataclass(frozen=True)
class StreamingWindow(RetentionPolicy):
    """window: tokens per layer kept besides the sinks."""

    window: int
    needs_observers = False

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1 token, got {self.window}")

    def retain(self, state: FoldState) -> Retention:
        n = state.chunk_len
        return Retention([None] * state.num_layers, [GroupDecision(0, state.num_layers - 1, 1.0, n, 0.0)])

    def evict(self, cache: PrunedCache, sink_tokens: int) -> list[int]:
        return enforce_budget(cache, sink_tokens + self.window, sink_tokens, by="recency")
