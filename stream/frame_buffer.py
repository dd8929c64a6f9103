"""The frames a live source has taken in and its stream has not yet: what `LiveSource` (read from a URL) and
`PushedFrames` (pushed by a realtime session) both hold between the source and the fold.

At most `capacity` frames wait; when folding lags, the oldest waiting frame is dropped and counted, never
the newest, so the stream stays close to now and says how much it missed.
"""

from __future__ import annotations

import threading
from collections import deque

from .sources import Frame


class FrameBuffer:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"buffer must hold at least 1 frame, got {capacity}")
        self.capacity = capacity
        self.dropped = 0  # frames dropped because folding lagged
        self._frames: deque[Frame] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def put(self, frame: Frame) -> None:
        with self._ready:
            if len(self._frames) >= self.capacity:  # folding lags: the oldest waiting frame goes
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self._ready.notify()

    def waiting(self) -> int:
        """Frames kept, not yet taken."""
        with self._ready:
            return len(self._frames)

    def get(self, timeout: float | None = None) -> Frame | None:
        """The oldest kept frame, waiting up to `timeout`; None on timeout or once closed and empty."""
        with self._ready:
            if not self._frames and not self._closed:
                self._ready.wait(timeout)
            return self._frames.popleft() if self._frames else None

    def close(self) -> None:
        """No more frames will come: a waiting `get` returns now."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()


class BufferedSource:
    """The part of a live source's interface that its buffer answers (LiveSource and PushedFrames share it)."""

    buffer: FrameBuffer

    @property
    def dropped(self) -> int:
        return self.buffer.dropped

    def waiting(self) -> int:
        """Frames kept, not yet taken."""
        return self.buffer.waiting()

    def get(self, timeout: float | None = None) -> Frame | None:
        """The oldest kept frame, waiting up to `timeout`; None on timeout or once stopped."""
        return self.buffer.get(timeout)
