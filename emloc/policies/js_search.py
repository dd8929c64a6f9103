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

    one_pass: evaluate a group's whole ratio ladder in one pass (a copy of each observer per
        candidate, `FoldState.divergences`) instead of one pass per ratio until one passes; the
        same choice for a fraction of the sequential passes. Flash attention, which takes no
        copies' mask, always searches one ratio at a time.
    """

    layer_group_size: int
    delta: float
    ratios: tuple[float, ...]
    one_pass: bool = True

    @classmethod
    def from_settings(cls, settings: EMLoCSettings) -> JSBoundedSearch:
        return cls(settings.layer_group_size, settings.delta, settings.ratios)

    def retain(self, state: FoldState) -> Retention:
        n, size = state.chunk_len, self.layer_group_size
        keep: list = [None] * state.num_layers
        groups = []
        for first in reversed(range(0, state.num_layers, size)):
            layers = range(first, first + size)
            # every ratio below "keep all": keeping everything reproduces the reference exactly
            candidates = [(ratio, kept_count(ratio, n)) for ratio in self.ratios]
            candidates = candidates[:next((i for i, (_, k) in enumerate(candidates) if k == n), len(candidates))]
            selections = [{layer: top_tokens(state.importance[layer], k) for layer in layers} for _, k in candidates]
            tried, decision, chosen = [], None, None
            # one pass for the whole ladder, the first that passes wins
            if self.one_pass and state.batched and candidates:
                tried = [(ratio, js) for (ratio, _), js in zip(candidates, state.divergences(first, selections))]
                passed = [i for i, (_, js) in enumerate(tried) if js <= self.delta]
                if passed:
                    (ratio, k), chosen = candidates[passed[0]], selections[passed[0]]
                    decision = GroupDecision(first, layers[-1], ratio, k, tried[passed[0]][1])
            else:  # one pass per ratio, stopping at the first that passes
                for (ratio, k), selection in zip(candidates, selections):
                    state.apply(selection)
                    js = state.divergence(first)
                    tried.append((ratio, js))
                    if js <= self.delta:
                        decision, chosen = GroupDecision(first, layers[-1], ratio, k, js), selection
                        break
            if decision is None:  # nothing passed, or the ratio keeps all: the whole chunk stays
                state.apply({layer: None for layer in layers})
                decision = GroupDecision(first, layers[-1], 1.0, n, 0.0)
            else:
                state.apply(chosen)
                keep[first:first + size] = [chosen[layer] for layer in layers]
            groups.append(GroupDecision(decision.first, decision.last, decision.ratio, decision.kept,
                                        decision.js, tuple(tried)))
        return Retention(keep, groups)
