"""Where a stream's video sits in time, and its compression past the model's temporal range.

A model takes temporal positions up to some range (a checkpoint may declare it, the settings may
override it). A stream that would reach past it halves the spacing of its video's temporal
positions: every committed video key is turned back by the difference between its old and new
position (RoPE is a rotation), and the next text goes right after the compressed video. A stream
that stays in range is never touched: its positions are the model processor's integers.
"""

from __future__ import annotations

import torch

from .adapters import ModelAdapter
from .cache import PrunedCache
from .settings import SettingsError


class TemporalPositions:
    """A stream's temporal bookkeeping.

    steps: temporal steps (frame pairs) of video folded so far.
    halvings: the video's temporal positions are spaced 2 ** -halvings apart.
    layout: (first origin, first step, tokens per step) of the video, one entry per change of frame
        size: a committed token's temporal step, to move its key when the positions are compressed.
    range: the temporal offsets the model takes; None: no limit, positions are never compressed.
    """

    def __init__(self, adapter: ModelAdapter, declared_range: int | None) -> None:
        """declared_range: the settings' temporal_range (None: the model's own, 0: never compress)."""
        self.adapter = adapter
        self.range = (adapter.temporal_range if declared_range is None else declared_range) or None
        if self.range is not None and adapter.temporal_policy_refusal:
            raise SettingsError(f"temporal_range={self.range} is not supported for "
                                f"{type(adapter).__name__}: {adapter.temporal_policy_refusal}")
        self.steps = 0
        self.halvings = 0
        self.layout: list[tuple[int, int, int]] = []

    @property
    def scale(self) -> float:
        return 2.0 ** -self.halvings

    def halvings_for(self, last_step: int) -> int:
        """How often the temporal spacing must be halved for temporal step `last_step` to fall
        within the range: what a stream folded up to that step has done (0 with no range)."""
        if self.range is None or last_step < 0:
            return 0
        last = float(self.adapter.temporal_offsets(torch.tensor([last_step]))[0])
        halvings = 0
        while last * 2.0 ** -halvings >= self.range:
            halvings += 1
        return halvings

    def note_chunk(self, first_origin: int, tokens_per_step: int) -> None:
        """Records a chunk about to be folded at step `steps`, its first token at `first_origin`."""
        if not self.layout or self.layout[-1][2] != tokens_per_step:
            self.layout.append((first_origin, self.steps, tokens_per_step))

    def step_of(self, origins: torch.Tensor) -> torch.Tensor:
        """The temporal step of video tokens, from their origins (index in the stream)."""
        steps = torch.zeros_like(origins)
        for first_origin, first_step, per_step in self.layout:
            part = origins >= first_origin
            steps[part] = first_step + (origins[part] - first_origin) // per_step
        return steps

    def fit(self, cache: PrunedCache, last_step: int, sink_tokens: int) -> bool:
        """Halves the spacing until temporal step `last_step` falls within the range, moving every
        committed video key (origin >= sink_tokens) of `cache`. Returns whether anything changed."""
        halvings = max(self.halvings, self.halvings_for(last_step))
        if halvings == self.halvings:
            return False
        change = 2.0 ** -halvings - self.scale
        for layer in cache.layers:
            if not layer.length:
                continue
            origins = layer.committed_origins()
            video = origins >= sink_tokens
            if not bool(video.any()):  # only the sinks: nothing moves
                continue
            offsets = self.adapter.temporal_offsets(self.step_of(origins.clamp(min=sink_tokens)))
            layer.replace_keys(self.adapter.shift_keys(layer.keys, torch.where(video, offsets * change, 0.0)))
        self.halvings = halvings
        return True

    def last_offset(self) -> float:
        """The temporal offset of the last folded step, before scaling."""
        return float(self.adapter.temporal_offsets(torch.tensor([self.steps - 1]))[0])
