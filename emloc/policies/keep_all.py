"""Full context: every layer keeps every token (the reference the benchmark measures against)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import FoldState, GroupDecision, Retention, RetentionPolicy


@dataclass(frozen=True)
class KeepAll(RetentionPolicy):
    needs_observers = False

    def retain(self, state: FoldState) -> Retention:
        n = state.chunk_len
        return Retention([None] * state.num_layers, [GroupDecision(0, state.num_layers - 1, 1.0, n, 0.0)])
