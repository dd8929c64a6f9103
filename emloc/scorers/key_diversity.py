"""Key diversity (kvpress's KeyDiff): tokens whose keys point away from the chunk's average
direction are the ones no other token can stand in for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ChunkView, Scorer


@dataclass(frozen=True)
class KeyDiversity(Scorer):
    """1 - cos(key, anchor), the anchor being the mean unit key of the chunk (per KV head),
    on keys with RoPE undone."""

    def raw(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        keys = F.normalize(chunk.unrotated_keys(layer), dim=-1)
        anchor = keys.mean(dim=2, keepdim=True)
        return 1 - F.cosine_similarity(keys, anchor.expand_as(keys), dim=-1)
