"""SnapKV-like baseline: each layer keeps the chunk tokens its observers attend to most,
at one fixed ratio, with no check of what that does to the output."""

from __future__ import annotations

from dataclasses import dataclass

from .base import FoldState, GroupDecision, Retention, RetentionPolicy, check_ratio, kept_count, top_tokens


@dataclass(frozen=True)
class ObserverTopK(RetentionPolicy):
    ratio: float

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    def retain(self, state: FoldState) -> Retention:
        k = kept_count(self.ratio, state.chunk_len)
        keep = [top_tokens(state.importance[layer], k) for layer in range(state.num_layers)]
        return Retention(keep, [GroupDecision(0, state.num_layers - 1, self.ratio, k, float("nan"))])
