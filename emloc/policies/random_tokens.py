"""Random token dropping baseline: each layer and KV head keeps a random subset of the chunk."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import FoldState, GroupDecision, Retention, RetentionPolicy, check_ratio, kept_count


@dataclass
class RandomTokens(RetentionPolicy):
    ratio: float
    seed: int = 0
    needs_observers = False
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        self.generator = torch.Generator().manual_seed(self.seed)

    def retain(self, state: FoldState) -> Retention:
        k = kept_count(self.ratio, state.chunk_len)
        shape = state.importance[0].shape
        keep = [torch.rand(shape, generator=self.generator).topk(k, dim=-1).indices.sort(dim=-1).values
                .to(state.importance[0].device) for _ in range(state.num_layers)]
        return Retention(keep, [GroupDecision(0, state.num_layers - 1, self.ratio, k, float("nan"))])
