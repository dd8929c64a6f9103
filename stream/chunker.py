"""Groups sampled frames into the chunks the context folds."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .sources import Frame


@dataclass(frozen=True)
class Chunk:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    times: list[float]  # presentation time of each frame, seconds


class Chunker:
    """Collects frames until `size` are waiting, then hands them out as one chunk.

    Frames that do not yet fill a chunk stay available through `pending()`, so a
    question asked now can still see them.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"chunk size must be >= 1 frame, got {size}")
        self.size = size
        self._frames: list[Frame] = []

    def push(self, frame: Frame) -> Chunk | None:
        self._frames.append(frame)
        return self._take() if len(self._frames) >= self.size else None

    def pending(self) -> Chunk | None:
        return _chunk(self._frames) if self._frames else None

    def flush(self) -> Chunk | None:
        """The frames left over at the end of a finite source, as a last (short) chunk."""
        return self._take() if self._frames else None

    def _take(self) -> Chunk:
        chunk, self._frames = _chunk(self._frames), []
        return chunk


def _chunk(frames: list[Frame]) -> Chunk:
    return Chunk(np.stack([f.image for f in frames]), [f.time for f in frames])


def chunks(frames: Iterable[Frame], size: int) -> Iterator[Chunk]:
    """Every chunk of a finite frame source, the last one possibly short."""
    chunker = Chunker(size)
    for frame in frames:
        chunk = chunker.push(frame)
        if chunk is not None:
            yield chunk
    last = chunker.flush()
    if last is not None:
        yield last
