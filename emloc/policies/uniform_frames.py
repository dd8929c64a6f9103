"""Uniform frame subsampling baseline: keep every token of evenly spaced frame pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FoldState, GroupDecision, Retention, RetentionPolicy, check_ratio


@dataclass(frozen=True)
class UniformFrames(RetentionPolicy):
    ratio: float
    needs_observers = False

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    def retain(self, state: FoldState) -> Retention:
        steps = int(state.token_steps.max()) + 1
        chosen = torch.linspace(0, steps - 1, max(1, round(self.ratio * steps))).round().long().unique()
        index = torch.isin(state.token_steps, chosen).nonzero().flatten().to(state.importance[0].device)
        heads = state.importance[0].shape[1]
        keep = index.view(1, 1, -1).expand(1, heads, -1).contiguous()
        groups = [GroupDecision(0, state.num_layers - 1, len(chosen) / steps, keep.shape[-1], float("nan"))]
        return Retention([keep] * state.num_layers, groups)
