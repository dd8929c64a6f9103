"""A coverage floor (LiveVLM's position buckets): the chunk is cut into stretches of time and
the best token of each stretch is ranked above every other token, so whatever count the
search keeps (>= the number of stretches), no stretch of time is dropped whole."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ChunkView, Scorer


@dataclass(frozen=True)
class CoverageFloor(Scorer):
    """inner's score, plus the chunk's highest score for the top token of each of `buckets`
    equal stretches of the chunk's temporal steps (per layer and KV head)."""

    inner: Scorer
    buckets: int

    def __post_init__(self) -> None:
        if not isinstance(self.buckets, int) or self.buckets < 1:
            raise ValueError(f"buckets must be an integer >= 1, got {self.buckets!r}")

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return self.inner.needs_attention

    @property
    def needs_template(self) -> bool:  # type: ignore[override]
        return self.inner.needs_template

    def raw(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        scores = self.inner.score(chunk, layer)
        steps = int(chunk.token_steps.max()) + 1
        bucket = (chunk.token_steps * min(self.buckets, steps)) // steps  # (n,) stretch of each token
        boost = scores.amax(dim=-1, keepdim=True)
        out = scores.clone()
        for b in bucket.unique().tolist():
            members = (bucket == b).nonzero().flatten().to(scores.device)
            best = members[scores[..., members].argmax(dim=-1)]  # (1, kv_heads)
            out.scatter_add_(-1, best.unsqueeze(-1), boost)
        return out
