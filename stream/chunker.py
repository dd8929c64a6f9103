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
    question asked now can still see them. Each frame is copied into the chunk's array
    as it arrives (the frame itself is not kept), so a chunk is held once, not twice.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"chunk size must be >= 1 frame, got {size}")
        self.size = size
        self._images: np.ndarray | None = None  # (size, H, W, 3), filled up to len(self._times)
        self._times: list[float] = []

    def push(self, frame: Frame) -> Chunk | None:
        if self._images is None:
            self._images = np.empty((self.size, *frame.image.shape), dtype=frame.image.dtype)
        elif frame.image.shape != self._images.shape[1:]:
            raise ValueError(f"frame of shape {frame.image.shape} in a chunk of {self._images.shape[1:]} frames")
        self._images[len(self._times)] = frame.image
        self._times.append(frame.time)
        return self._take() if len(self._times) >= self.size else None

    def pending(self) -> Chunk | None:
        return Chunk(self._images[:len(self._times)], list(self._times)) if self._times else None

    def flush(self) -> Chunk | None:
        """The frames left over at the end of a finite source, as a last (short) chunk."""
        return self._take() if self._times else None

    def _take(self) -> Chunk:
        chunk = Chunk(self._images[:len(self._times)], self._times)
        self._images, self._times = None, []
        return chunk


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
