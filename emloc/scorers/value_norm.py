"""Value norm (InfiniPot-V's VaN): tokens whose values are large move the attention output most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ChunkView, Scorer


@dataclass(frozen=True)
class ValueNorm(Scorer):
    """L2 norm of each token's value vector, per KV head."""

    def raw(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        return chunk.values[layer].float().norm(dim=-1)
