"""EMLoC: per layer group, the smallest retention whose observer output stays within
a Jensen-Shannon bound of the unpruned output (method.md, section 2)."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import EMLoCSettings
from .base import FoldState, GroupDecision, Retention, RetentionPolicy, kept_count, top_tokens


@dataclass(frozen=True)
class JSBoundedSearch(RetentionPolicy):
    """Top group first; for each group the first ascending ratio with JS <= delta, else keep all.

    Groups above the one searched already hold their choice and groups below are
    still whole, so the observer restarts at the group's first layer.
    """

    layer_group_size: int
    delta: float
    ratios: tuple[float, ...]

    @classmethod
    def from_settings(cls, settings: EMLoCSettings) -> JSBoundedSearch:
        return cls(settings.layer_group_size, settings.delta, settings.ratios)

    def retain(self, state: FoldState) -> Retention:
        n, size = state.chunk_len, self.layer_group_size
        keep: list = [None] * state.num_layers
        groups = []
        for first in reversed(range(0, state.num_layers, size)):
            layers = range(first, first + size)
            tried, decision = [], None
            for ratio in self.ratios:
                k = kept_count(ratio, n)
                if k == n:  # keeping everything reproduces the reference exactly
                    break
                selection = {layer: top_tokens(state.importance[layer], k) for layer in layers}
                state.apply(selection)
                js = state.divergence(first)
                tried.append((ratio, js))
                if js <= self.delta:
                    keep[first:first + size] = [selection[layer] for layer in layers]
                    decision = GroupDecision(first, layers[-1], ratio, k, js)
                    break
            if decision is None:  # nothing passed, or the ratio keeps all: the whole chunk stays
                if tried:
                    state.apply({layer: None for layer in layers})
                decision = GroupDecision(first, layers[-1], 1.0, n, 0.0)
            groups.append(GroupDecision(decision.first, decision.last, decision.ratio, decision.kept,
                                        decision.js, tuple(tried)))
        return Retention(keep, groups)
