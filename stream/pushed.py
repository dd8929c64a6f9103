"""A live source whose frames are pushed to it (by a realtime WebSocket session) instead of read from a URL.

It has `LiveSource`'s interface (start, stop, get, waiting, state, dropped, ...), so a `LiveStream`
serves it like any camera, and it keeps frames the same way: sampled at the stream's rate by
timestamp, at most `buffer` of them held while folding; when folding lags, the oldest waiting
frame is dropped (and counted in `dropped`, which the status, the metrics and the page report).

Times: each session gives its frames either its own timestamps (seconds, increasing) or none, and
then their arrival time counts; the session's first frame lands just after the stream's newest
(a stream outlives its session: the next session goes on where the last one stopped), and the
others keep their spacing from it. Whatever the client says, stream time only moves forward.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .frame_buffer import BufferedSource, FrameBuffer
from .sources import Frame, RateSampler


class FrameRefused(ValueError):
    """A pushed frame that cannot be taken; the message says why (nothing else is affected)."""


class PushedFrames(BufferedSource):
    def __init__(self, *, fps: float = 2.0, buffer: int = 16, start_time: float = 0.0) -> None:
        self.buffer = FrameBuffer(buffer)  # refuses a buffer of no frames first
        self.fps, self.start_time = fps, start_time
        self._sampler = RateSampler(fps)
        self.size: tuple[int, int] | None = None  # (height, width) of the stream's frames, from its first
        self.state = "reconnecting"  # connected while a session pushes; "reconnecting" between sessions
        self.last_error = "no realtime session yet"
        self.connects = 0
        self.received = 0  # frames pushed and accepted (kept by the sampler or not)
        self.skipped_packets = 0  # LiveSource's: a pushed frame is whole or refused, never skipped
        self.awaiting_keyframe = False
        self.newest_time: float | None = None
        self._clock: str | None = None  # this session's: "client" (its timestamps) or "arrival"
        self._origin: tuple[float, float] | None = None  # (the session's first time, its stream time)
        self._last_given: float | None = None

    # --- LiveSource's interface (the serving thread) ---------------------------------------
    def start(self) -> PushedFrames:
        return self

    def stop(self, wait: float = 0.0) -> None:
        """wait: LiveSource's (how long its reader is waited for); nothing to wait for here."""
        self.buffer.close()
        self.state = "stopped"

    # --- the session's side ---------------------------------------------------------------
    def open(self) -> None:
        """A session begins: its clock starts after the stream's newest frame."""
        self.state, self.last_error, self.connects = "connected", "", self.connects + 1
        self._clock = self._origin = self._last_given = None

    def close(self, why: str) -> None:
        self.state, self.last_error = "reconnecting", why

    def push(self, image: np.ndarray, timestamp: float | None = None) -> tuple[bool, float]:
        """Takes one decoded (H, W, 3) uint8 RGB frame; returns (kept by the sampler, its stream time).
        FrameRefused for a frame of another size than the stream's, or a timestamp that does not
        follow the session's clock."""
        if self.size is not None and image.shape[:2] != self.size:
            raise FrameRefused(f"the frame is {image.shape[1]}x{image.shape[0]}; this stream's frames are "
                               f"{self.size[1]}x{self.size[0]} (every frame of a stream has one size)")
        clock = "arrival" if timestamp is None else "client"
        if self._clock is not None and clock != self._clock:
            raise FrameRefused(f"this session's frames {'carry' if self._clock == 'client' else 'carry no'} "
                               f"timestamps: give {'one with every' if self._clock == 'client' else 'none with any'}"
                               f" frame")
        if timestamp is not None:
            if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp) \
                    or timestamp < 0:
                raise FrameRefused(f"'timestamp' must be a finite number of seconds >= 0, got {str(timestamp)[:40]}")
            if self._last_given is not None and timestamp <= self._last_given:
                raise FrameRefused(f"timestamp {timestamp:g} s does not follow the previous frame's "
                                   f"({self._last_given:g} s): timestamps must increase")
            self._last_given = float(timestamp)
        given = float(timestamp) if timestamp is not None else time.monotonic()
        if self._origin is None:
            self._clock = clock
            first = self.start_time if self.newest_time is None else self.newest_time + 1.0 / self.fps
            self._origin = (given, first)
        stream_time = self._origin[1] + (given - self._origin[0])
        if self.newest_time is not None and stream_time <= self.newest_time:  # arrival times can tie
            stream_time = self.newest_time + 1e-3
        self.size = image.shape[:2]
        self.received += 1
        self.newest_time = stream_time
        if not self._sampler.keep(stream_time):
            return False, stream_time
        self.buffer.put(Frame(image, stream_time))  # folding lags: the oldest waiting frame goes
        return True, stream_time
