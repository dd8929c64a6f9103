"""Scorers together: a weighted sum of their chunk-relative scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ChunkView, Scorer


@dataclass(frozen=True)
class Combined(Scorer):
    """sum_i weight_i * score_i, each score already relative to the chunk (mean 1), so no
    scorer dominates by its units. parts: ((scorer, weight), ...)."""

    parts: tuple[tuple[Scorer, float], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a combination needs at least one scorer")
        for _, weight in self.parts:
            if not weight > 0:
                raise ValueError(f"weights must be > 0, got {weight!r}")

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return any(s.needs_attention for s, _ in self.parts)

    @property
    def needs_template(self) -> bool:  # type: ignore[override]
        return any(s.needs_template for s, _ in self.parts)

    def raw(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        return sum(weight * scorer.score(chunk, layer) for scorer, weight in self.parts)
