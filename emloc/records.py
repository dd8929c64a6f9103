"""What a fold and an answer report."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .forward import LayerWork
from .observer import Observer
from .policies import GroupDecision


@dataclass
class FoldRecord:
    """One chunk folded into the cache.

    kept[l]: tokens of this chunk layer l kept; evicted[l]: tokens the budget removed.
    tokens_before/after[l]: committed tokens of layer l around the fold.
    positions: (first, last) temporal position of the chunk; max_position: highest seen.
    temporal_scale: the video's temporal spacing after this fold (below 1 once the stream has
        reached past its model's temporal range).
    work: sequential decoder-layer calls and tokens x layers the fold made (prefill, observers,
        search): what it costs a GPU, whatever hardware ran it.
    """

    index: int
    frames: int
    padded_frames: int
    chunk_tokens: int
    groups: list[GroupDecision]
    kept: list[int]
    evicted: list[int]
    tokens_before: list[int]
    tokens_after: list[int]
    observers: list[Observer]
    positions: tuple[int, int]
    max_position: int
    time_span: tuple[float, float] | None
    cache_bytes: int
    vision_s: float
    prefill_s: float
    observe_s: float
    search_s: float
    evaluations: int
    score_s: float = 0.0  # ranking the chunk's tokens (the scorer), within the fold
    temporal_scale: float = 1.0
    work: LayerWork = field(default_factory=LayerWork)  # decoder-layer calls and tokens x layers of the fold

    @property
    def kept_fraction(self) -> float:
        return sum(self.kept) / (len(self.kept) * self.chunk_tokens)

    @property
    def search_over_prefill(self) -> float:
        """Time finding the retention (observer pass + candidates) per second of prefill."""
        return (self.observe_s + self.search_s) / max(self.vision_s + self.prefill_s, 1e-9)

    def summary(self) -> str:
        groups = " ".join(f"L{g.first}-{g.last}:{g.ratio:g}(js={g.js:.3f})" for g in self.groups)
        span = f" t={self.time_span[0]:.1f}-{self.time_span[1]:.1f}s" if self.time_span else ""
        cache = sum(self.tokens_after) / len(self.tokens_after)
        observer = self.observers[0].kind if self.observers else "none"
        return (f"chunk {self.index}: {self.frames} frames, {self.chunk_tokens} tokens -> kept "
                f"{100 * self.kept_fraction:.1f}% [{groups}] cache {cache:.0f} tok/layer{span}, "
                f"observer={observer}, prefill {self.vision_s + self.prefill_s:.3f}s "
                f"search {self.observe_s + self.search_s:.3f}s"
                + (f", temporal positions x{self.temporal_scale:g}" if self.temporal_scale != 1 else ""))


@dataclass
class Answer:
    """An answer over the cache as it stood; the cache is left unchanged.

    latency_s = first_token_s + decode_s (+ bookkeeping): the first token waits for any frames
    not yet in a chunk and the question's prefill over the cache; each later token is one pass.

    prompt_logits: (question tokens, vocab) float32 logits, when asked for.
    """

    question: str
    text: str
    token_ids: list[int]
    cache_tokens: int
    chunks_folded: int
    time_span: tuple[float, float] | None
    latency_s: float
    prompt_logits: torch.Tensor | None = field(default=None, repr=False)
    first_token_s: float = 0.0  # time to first token: frames not yet folded, then the question's pass
    decode_s: float = 0.0  # every later token, one sequential pass each

    @property
    def decode_s_per_token(self) -> float:
        return self.decode_s / max(len(self.token_ids) - 1, 1)
