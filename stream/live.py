"""Live sources (RTSP, UDP/TCP MPEG-TS, HTTP, V4L2 devices) read with PyAV in a thread.

The reader samples frames at the target rate and keeps only the newest `buffer` of them:
when folding is slower than the source, older frames are dropped (and counted), never
queued without bound. Packets are decoded one by one: one the decoder cannot use (a
reader that joined mid-GOP, or lost packets, has no reference frame until the next
keyframe) is skipped and counted, never a reason to reconnect, because a reconnect joins
mid-GOP again and a camera sends a keyframe only every 4-10 s or more. The source is
reopened only when no packet arrives for `read_timeout` (then at once: the silence was
the wait, and a restarted UDP source's first keyframe must find us listening) or when it
ends or cannot be opened (then with exponential backoff); timestamps keep increasing
across reconnects.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from .frame_buffer import BufferedSource, FrameBuffer
from .sources import Frame, RateSampler, upright

log = logging.getLogger("emloc_stream")


class LiveSource(BufferedSource):
    """url: anything FFmpeg opens (rtsp://, udp://, tcp://, http://, /dev/video0 with format='v4l2')."""

    def __init__(self, url: str, *, fps: float = 2.0, buffer: int = 16, format: str | None = None,
                 options: dict[str, str] | None = None, open_timeout: float = 5.0, read_timeout: float = 3.0,
                 backoff: tuple[float, float] = (0.5, 8.0), start_time: float = 0.0) -> None:
        self.buffer = FrameBuffer(buffer)  # refuses a buffer of no frames first
        self.url, self.fps, self.format, self.options = url, fps, format, dict(options or {})
        # FFmpeg probes a stream for 5 s of its time by default, waiting for parameters that only come with a
        # keyframe; a probe that outlasts the open timeout is cut off and leaves the connection unusable, so
        # it stops at half that timeout (the decoder reads the parameters from the keyframe when it comes).
        self.options.setdefault("analyzeduration", str(round(open_timeout * 500_000)))
        self.open_timeout, self.read_timeout, self.backoff = open_timeout, read_timeout, backoff
        self.start_time = start_time  # timestamp of the first frame (a resumed stream goes on from its last)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = "starting"  # starting, connected, reconnecting, stopped
        self.connects = 0
        self.last_error = ""
        self.skipped_packets = 0  # packets the decoder could not use (no keyframe yet, or damaged), skipped
        self.awaiting_keyframe = False  # connected, no frame decoded yet on this connection
        self.newest_time: float | None = None  # newest frame the source produced (kept or not)
        # the wall-clock (Unix) time of stream time 0 on this connection, from its least-delayed frame so far (a
        # frame read late, while the process was busy, only seems older); events timed by the wall clock map here
        self.clock_origin: float | None = None

    def start(self) -> LiveSource:
        self._thread = threading.Thread(target=self._run, name=f"live:{self.url}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: float = 1.0) -> None:
        """Stops reading. The reader is waited for `wait` s at most: one blocked in FFmpeg (opening a source
        that does not answer, or a read) ends on its own at the open or read timeout, a daemon thread that
        keeps no process alive, so a stop never waits for a silent camera."""
        self._stop.set()
        self.buffer.close()
        if self._thread is not None:
            self._thread.join(timeout=wait)
        self.state = "stopped"

    # --- reader thread ---------------------------------------------------------------
    def _run(self) -> None:
        delay, offset, last = self.backoff[0], self.start_time, None
        while not self._stop.is_set():
            silent = False
            try:
                produced = False
                for time_s in self._read(offset):
                    produced = True
                    last = time_s
                    delay = self.backoff[0]
                if produced:
                    self.last_error = "source ended"
            except NoData as error:
                self.last_error, silent = str(error), True
            except Exception as error:  # PyAV raises many kinds when opening or reading; each means: reconnect
                self.last_error = f"{type(error).__name__}: {error}"
            if self._stop.is_set():
                break
            self.state = "reconnecting"
            if last is not None:
                offset = last + 1.0 / self.fps  # timestamps continue after a reconnect
            if silent:  # the timeout already waited; listen again now, not after a backoff
                log.warning("%s: %s; reconnecting", self.url, self.last_error)
                continue
            log.warning("%s: %s; reconnecting in %.1f s", self.url, self.last_error, delay)
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff[1])

    def _read(self, offset: float):
        import av

        try:
            container = av.open(self.url, format=self.format, options=self.options,
                                timeout=(self.open_timeout, self.read_timeout))
        except av.error.ExitError as error:  # FFmpeg's "Immediate exit requested": our timeout fired
            raise NoData(f"no data from {self.url} for {self.open_timeout:g} s") from error
        try:
            if not container.streams.video:
                raise RuntimeError(f"{self.url}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            self.state, self.connects = "connected", self.connects + 1
            self.awaiting_keyframe = True
            sampler, first, t, origin = RateSampler(self.fps), None, None, None
            for frame in self._decoded(container, stream):
                self.awaiting_keyframe = False
                if self._stop.is_set():
                    return
                pts = float(frame.time) if frame.time is not None else time.monotonic()
                if first is None or (t is not None and offset + pts - first < t - 1.0):
                    # the first frame, or timestamps that went back: a source restarted within the read timeout
                    # (or whose clock wrapped) goes on from where it was, not from its old timestamps
                    offset, first = (offset if t is None else t + 1.0 / self.fps), pts
                    origin = None
                t = offset + pts - first
                self.newest_time = t
                origin = min(origin or math.inf, time.time() - t)
                self.clock_origin = origin
                if not sampler.keep(t):
                    continue
                image = upright(frame)
                self.buffer.put(Frame(image, t))
                yield t
        finally:
            container.close()

    def _decoded(self, container, stream):
        """The frames of `stream`, packet by packet; a packet the decoder rejects is skipped (the decoder
        resumes at the next keyframe by itself). NoData when no packet arrives for the read timeout."""
        import av

        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.ExitError as error:
                raise NoData(f"no data from {self.url} for {self.read_timeout:g} s") from error
            try:
                yield from packet.decode()  # an empty packet at the end flushes the decoder's last frames
            except av.error.InvalidDataError as error:
                self.skipped_packets += 1
                if self.skipped_packets == 1 or self.skipped_packets % 100 == 0:
                    log.info("%s: %d undecodable packets skipped so far (waiting for a keyframe): %s",
                             self.url, self.skipped_packets, error)


class NoData(RuntimeError):
    """The source sent nothing for the open or read timeout."""
