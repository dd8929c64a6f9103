"""A video sent to `/v1/chat/completions` as a `video_url` content part (the schema of vLLM and SGLang, which
clients such as the official `openai` package send), answered by the one video job (stream/job.py),
query-aware: the question is known before the video, so it guides what the cache keeps.

Where a video may come from; anything else is refused, by name:
- a file: `file:///path` or an absolute path, only inside a folder the operator allows (`--http-video-dir`),
  decided on the path with `..` and every symlink resolved, so neither leads out of it;
- `http(s)://` and `rtsp://` URLs, only when the operator allows remote sources (`--http-video-remote`):
  the server then fetches what a client names (a download is cut at the size limit; a live RTSP source is
  read for at most the duration limit);
- `data:video/...;base64,...`: the video in the request itself.

Limits (`HttpLimits`): bytes of a video (413, refused before more is read: the request body by the Guard, a
download as it comes, a file by its size), seconds of video (413, by the container's header and again by
the frames' times, so a header that lies does not help), pixels of a frame (413); one video job at a time
and a few waiting (429 beyond). A video whose frames do not decode gets 422. A client that leaves stops
its job at the next frame. Nothing is kept: a sent or fetched video lives in a temporary file for its job.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from emloc import InputError, StreamContext

from ..job import CountedFrames, answer_video
from ..sources import Frame, VideoError, VideoFile
from .guard import HttpLimits

REMOTE_SCHEMES = ("http", "https", "rtsp")
FETCH_TIMEOUT = 30.0  # seconds a remote server may stay silent


class VideoRefused(Exception):
    """A video_url this server will not or cannot answer; `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Stopped(Exception):
    """The client left: the job stops at the next frame."""


@dataclass(frozen=True)
class VideoAnswer:
    text: str
    question_tokens: int  # the question's tokens, as the model read them after the video
    answer_tokens: int  # tokens generated
    video_tokens: int  # the video's tokens the model read, chunk by chunk, before pruning
    video_tokens_kept: float  # per layer, after pruning: what the answer was computed over
    frames: int  # frames sampled
    time_span: tuple[float, float] | None  # first and last second of video seen


class VideoAnswerer:
    """The model, its settings and the limits, shared by every video_url request of one server."""

    def __init__(self, adapter, settings, *, fps: float, max_new_tokens: int, limits: HttpLimits,
                 name: str = "emloc") -> None:
        """name: the model's, as /v1/models lists it beside the streams (clients pick a model from that list)."""
        self.adapter, self.settings, self.fps, self.max_new_tokens = adapter, settings, fps, max_new_tokens
        self.name = name
        self.limits = limits
        self.dirs = [Path(d).resolve() for d in limits.video_dirs]
        self.running = asyncio.Semaphore(1)  # one video job at a time: each one is all of a CPU's work
        self.waiting = 0

    async def answer(self, url: str, question: str, stop: threading.Event) -> VideoAnswer:
        """The answer to `question` about the video at `url`; VideoRefused for a video it will not answer. Setting
        `stop` (the client left) ends the job at its next frame; the next job starts only once it has ended."""
        if self.waiting >= self.limits.video_queue:
            raise VideoRefused(429, f"{self.waiting} video jobs are waiting already (the limit is "
                                    f"{self.limits.video_queue}); retry later")
        self.waiting += 1
        try:
            await self.running.acquire()
        finally:
            self.waiting -= 1
        job = asyncio.ensure_future(asyncio.to_thread(self._answer, url, question, stop))
        job.add_done_callback(lambda done: (self.running.release(), done.cancelled() or done.exception()))
        try:
            return await asyncio.shield(job)  # cancelled (the client left): the thread still ends before the next
        except asyncio.CancelledError:
            stop.set()
            raise

    def _answer(self, url: str, question: str, stop: threading.Event) -> VideoAnswer:
        with tempfile.TemporaryDirectory(prefix="emloc-video-") as tmp:
            frames = CountedFrames(self._frames(url, Path(tmp), stop))
            context = StreamContext(self.adapter, settings=self.settings)
            try:
                [answer] = answer_video(context, frames, [question], query_aware=True,
                                        max_new_tokens=self.max_new_tokens, stream_id="video_url")
            except InputError as error:  # e.g. a video without frames
                raise VideoRefused(422, str(error)) from error
        return VideoAnswer(answer.text, len(self.adapter.question_ids(question)), len(answer.token_ids),
                           context.video_tokens_seen(), context.video_tokens_kept(), frames.count,
                           answer.time_span)

    def check(self, url: str) -> tuple[str, str]:
        """Where the video is, as (kind, place): ("data", url), ("file", resolved path), ("http", url) or ("rtsp",
        url); VideoRefused for a video refused before anything is read or decoded (its scheme, its place, its size
        as the request or the file system says it)."""
        scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
        if scheme == "data":
            self._data_header(url)
            return "data", url
        if scheme == "file" or (not scheme and url.startswith("/")):
            return "file", str(self._local(urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme else url))
        if scheme in REMOTE_SCHEMES:
            if not self.limits.video_remote:
                raise VideoRefused(403, f"{scheme}:// video URLs are not fetched by this server (its operator "
                                        f"allows remote sources with --http-video-remote); send the video as a "
                                        f"data: URL")
            return ("rtsp" if scheme == "rtsp" else "http"), url
        raise VideoRefused(400, f"video_url {url[:60]!r} is not a data: URL, a file path or an "
                                f"{'/'.join(REMOTE_SCHEMES)} URL")

    def _frames(self, url: str, tmp: Path, stop: threading.Event) -> Iterator[Frame]:
        """The video's frames sampled at the model's fps, checked against the limits as they come."""
        kind, place = self.check(url)
        if kind == "rtsp":
            return self._checked(self._rtsp(place, stop), place[:100], stop)
        path = self._from_data(place, tmp) if kind == "data" else self._download(place, tmp) if kind == "http" \
            else Path(place)
        video = VideoFile(path)
        duration = video.duration()
        if duration is not None and duration > self.limits.max_video_seconds:
            raise VideoRefused(413, f"the video lasts {duration:.0f} s; the limit is "
                                    f"{self.limits.max_video_seconds:g} s")
        label = {"data": "the video sent", "http": place[:100]}.get(kind, f"video {path.name}")
        return self._checked(video.frames(fps=self.fps), label, stop, hide=str(path))

    def _checked(self, frames: Iterator[Frame], label: str, stop: threading.Event, hide: str = "") -> Iterator[Frame]:
        """`frames`, refused (VideoRefused) past a limit or when they do not decode; Stopped once `stop` is set."""
        limits, first = self.limits, None
        try:
            for frame in frames:
                if stop.is_set():
                    raise Stopped()
                height, width = frame.image.shape[:2]
                if width * height > limits.max_video_pixels:
                    raise VideoRefused(413, f"the video's frames are {width}x{height}; the limit is "
                                            f"{limits.max_video_pixels} pixels a frame")
                first = frame.time if first is None else first
                if frame.time - first > limits.max_video_seconds:
                    raise VideoRefused(413, f"the video lasts more than {limits.max_video_seconds:g} s, the limit")
                yield frame
        except VideoError as error:  # where the file lies (a temporary file, for a video sent) is not for the client
            message = str(error).removeprefix(f"{hide}: ").replace(hide, "it") if hide else str(error)
            raise VideoRefused(422, f"{label} could not be read: {message}") from None
        if first is None:
            raise VideoRefused(422, f"{label} holds no frame that decodes")

    def _data_header(self, url: str) -> None:
        head, comma, payload = url.partition(",")
        if not comma or not head.endswith(";base64"):
            raise VideoRefused(400, "a data: video_url must be base64: data:video/mp4;base64,<bytes>")
        kind = head[len("data:"):-len(";base64")].lower()
        if not (kind.startswith("video/") or kind == "application/octet-stream"):
            raise VideoRefused(415, f"a data: video_url must hold a video (data:video/...), got {kind[:40]!r}")
        if len(payload) > 4 * (self.limits.max_video_bytes + 2) // 3:
            raise VideoRefused(413, f"the video sent is about {len(payload) * 3 // 4} bytes; the limit is "
                                    f"{self.limits.max_video_bytes} bytes")

    def _from_data(self, url: str, tmp: Path) -> Path:
        try:
            data = base64.b64decode(url.partition(",")[2], validate=True)
        except (binascii.Error, ValueError) as error:
            raise VideoRefused(400, f"the data: video_url is not valid base64 ({error})") from None
        path = tmp / "sent"
        path.write_bytes(data)
        return path

    def _local(self, name: str) -> Path:
        if not self.dirs:
            raise VideoRefused(403, f"video path {name[:200]!r}: this server reads no video files (its operator "
                                    f"allows folders with --http-video-dir); send the video as a data: URL")
        try:
            path = Path(name).resolve(strict=True)  # `..` and symlinks resolved: where the file really is
        except (OSError, RuntimeError, ValueError):
            path = None
        if path is None or not any(path.is_relative_to(d) for d in self.dirs):
            raise VideoRefused(403, f"video path {name[:200]!r} is not inside the folders this server allows "
                                    f"({', '.join(str(d) for d in self.dirs)})")
        if not path.is_file():
            raise VideoRefused(400, f"video path {name[:200]!r} is not a file")
        size = path.stat().st_size
        if size > self.limits.max_video_bytes:
            raise VideoRefused(413, f"video {path.name} is {size} bytes; the limit is {self.limits.max_video_bytes} "
                                    f"bytes")
        return path

    def _download(self, url: str, tmp: Path) -> Path:
        limit, path = self.limits.max_video_bytes, tmp / "fetched"
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response, open(path, "wb") as out:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > limit:
                    raise VideoRefused(413, f"{url[:100]} is {length} bytes; the limit is {limit} bytes")
                size = 0
                while chunk := response.read(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        raise VideoRefused(413, f"{url[:100]} is more than {limit} bytes, the limit")
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise VideoRefused(422, f"could not fetch {url[:100]}: {getattr(error, 'reason', error)}") from None
        return path

    def _rtsp(self, url: str, stop: threading.Event) -> Iterator[Frame]:
        """A live RTSP source, read as `live` reads one (frames dropped when folding lags), until it ends (its
        reader reconnecting after frames came) or the duration limit is reached: a live source is cut there, not
        refused. A source that gives no frame within FETCH_TIMEOUT seconds is refused."""
        from ..live import LiveSource

        source = LiveSource(url, fps=self.fps, buffer=64).start()
        first, silent_since = None, time.monotonic()
        try:
            while not stop.is_set():
                frame = source.get(timeout=0.5)
                if frame is None:
                    if first is not None and source.state == "reconnecting":
                        return  # the source ended
                    if time.monotonic() - silent_since > FETCH_TIMEOUT:
                        raise VideoRefused(422, f"{url[:100]} sent no frame within {FETCH_TIMEOUT:g} s "
                                                f"({source.last_error or 'nothing came'})")
                    continue
                silent_since = time.monotonic()
                first = frame.time if first is None else first
                if frame.time - first > self.limits.max_video_seconds:
                    return  # the limit: answered over what came before it
                yield frame
        finally:
            source.stop()
