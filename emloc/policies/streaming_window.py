"""StreamingLLM baseline: the attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import enforce_budget
from ..cache import PrunedCache
from .keep_all import KeepAll


@dataclass(frozen=True)
class StreamingWindow(KeepAll):
    """Keeps every chunk token, then evicts all but the sinks and the newest `window` tokens per layer."""

    window: int

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1 token, got {self.window}")

    def evict(self, cache: PrunedCache, sink_tokens: int) -> list[int]:
        return enforce_budget(cache, sink_tokens + self.window, sink_tokens, by="recency")
