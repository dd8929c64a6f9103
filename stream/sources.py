"""Frame sources: video files (decord, PyAV as fallback), with every frame's timestamp.

A source yields `Frame`s (RGB uint8 and presentation time in seconds); `sample` picks
frames at a target rate by timestamp, so variable-frame-rate input is sampled right.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


class VideoError(RuntimeError):
    """A video cannot be opened or decoded; the message names the file."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    time: float  # presentation time, seconds from the start


class VideoFile:
    """A video file. backend: 'auto' (decord, else PyAV), 'decord' or 'av'."""

    def __init__(self, path: str | Path, backend: str = "auto") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoError(f"{self.path}: no such video file")
        if backend not in ("auto", "decord", "av"):
            raise ValueError(f"backend must be 'auto', 'decord' or 'av', got {backend!r}")
        self.backend = backend
        self.used: str | None = None  # the backend that read the file

    def duration(self) -> float | None:
        """Length in seconds from the container's header, if it says (for progress only)."""
        import av

        try:
            with av.open(str(self.path)) as container:
                if container.duration:
                    return container.duration / 1_000_000
                stream = container.streams.video[0]
                return float(stream.duration * stream.time_base) if stream.duration else None
        except (av.error.FFmpegError, IndexError):
            return None

    def check(self) -> None:
        """Decodes the first frame as `frames` does: a file no backend reads is named before any work."""
        _first(self)

    def frames(self, fps: float | None = None) -> Iterator[Frame]:
        """Every frame, or frames sampled at `fps` by timestamp."""
        errors = []
        for name in (("decord", "av") if self.backend == "auto" else (self.backend,)):
            try:
                self.used = name
                reader = _decord_frames if name == "decord" else _av_frames
                yield from reader(self.path, fps)
                return
            except _Unreadable as error:  # nothing yielded yet: the next backend may read it
                errors.append(f"{name}: {error}")
        raise VideoError(f"{self.path}: cannot decode video ({'; '.join(errors)})")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class ImageFolder:
    """A folder of images, one frame each in file-name order, `fps` frames per second of
    stream time (the sampler then picks frames at the model's rate)."""

    def __init__(self, path: str | Path, fps: float = 2.0) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise VideoError(f"{self.path}: not a folder of images")
        if fps <= 0:
            raise ValueError(f"image folder fps must be > 0, got {fps}")
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise VideoError(f"{self.path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.fps = fps

    def duration(self) -> float:
        return len(self.files) / self.fps

    def check(self) -> None:
        """Reads the first image as `frames` does: an unreadable one is named before any work."""
        _first(self)

    def frames(self, fps: float | None = None) -> Iterator[Frame]:
        from PIL import Image, UnidentifiedImageError

        size = None

        def read(i: int, file: Path) -> Frame:
            nonlocal size
            try:
                with Image.open(file) as image:
                    array = np.asarray(image.convert("RGB"))
            except (OSError, UnidentifiedImageError) as error:
                raise VideoError(f"{file}: cannot read image: {error}") from error
            if size is None:
                size = array.shape
            elif array.shape != size:
                raise VideoError(f"{file}: image is {array.shape[1]}x{array.shape[0]}, the folder's first image is "
                                 f"{size[1]}x{size[0]}; a stream's frames must share one size")
            return Frame(array, i / self.fps)

        sampler = RateSampler(fps) if fps else None
        for i, file in enumerate(self.files):  # sampled by time before decoding: skipped files are never read
            if sampler is None or sampler.keep(i / self.fps):
                yield read(i, file)


def _first(source) -> None:
    frames = source.frames()
    try:
        next(frames, None)
    finally:
        frames.close()


def open_source(path: str | Path, fps_for_images: float = 2.0):
    """A video file or a folder of images."""
    return ImageFolder(path, fps_for_images) if Path(path).is_dir() else VideoFile(path)


class _Unreadable(Exception):
    pass


class RateSampler:
    """Keeps the first frame at or after each instant start + k / fps (k = 0, 1, ...)."""

    def __init__(self, fps: float) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.fps = fps
        self.next_time: float | None = None

    def keep(self, time: float) -> bool:
        if self.next_time is None:
            self.next_time = time
        if time + 1e-6 < self.next_time:
            return False
        self.next_time += (math.floor((time - self.next_time) * self.fps + 1e-6) + 1) / self.fps
        return True


def sample(frames: Iterable[Frame], fps: float) -> Iterator[Frame]:
    """The frames a `RateSampler` keeps."""
    sampler = RateSampler(fps)
    return (frame for frame in frames if sampler.keep(frame.time))


BATCH_BYTES = 64 * 2**20  # decoded frames held at once by the decord reader


def _decord_frames(path: Path, fps: float | None) -> Iterator[Frame]:
    """Frames in batches of about BATCH_BYTES, each from a reader opened for it alone: an open
    decord reader keeps decoding ahead in the background, into buffers that grew past 1.5 GB at
    640x360 while one chunk was folded; closing it after each batch bounds that."""
    try:
        import decord
    except ImportError as error:
        raise _Unreadable("decord is not installed") from error
    decord.logging.set_level(decord.logging.QUIET)  # its FFmpeg's log lines; our own message says what failed

    def reader():
        return decord.VideoReader(str(path), ctx=decord.cpu(0))

    try:
        with _quiet_stderr():  # decord's C++ log lines ("[time] /its/build/path.cc:83: ERROR ...")
            first_reader = reader()
            times = first_reader.get_frame_timestamp(np.arange(len(first_reader)))[:, 0]
            height, width = first_reader[0].shape[:2] if len(times) else (0, 0)
            del first_reader
    except Exception as error:  # decord raises its own DECORDError, and RuntimeError
        raise _Unreadable(_clean(error)) from error
    if len(times) == 0:
        raise _Unreadable("no frames")
    if fps is None:
        indices = list(range(len(times)))
    else:
        sampler = RateSampler(fps)
        indices = [i for i, t in enumerate(times) if sampler.keep(float(t))]
    per_batch = max(1, min(64, BATCH_BYTES // (height * width * 3)))
    first = True
    for start in range(0, len(indices), per_batch):
        batch = indices[start:start + per_batch]
        try:
            with _quiet_stderr():
                images = reader().get_batch(batch).asnumpy()
        except Exception as error:
            if first:  # e.g. decord 0.6 on a file with rotation metadata: PyAV reads it upright
                raise _Unreadable(_clean(error)) from error
            raise VideoError(f"{path}: decoding failed at frame {batch[0]}: {_clean(error)}") from error
        first = False
        for i, image in zip(batch, images):
            yield Frame(image, float(times[i]))
        del images  # before the next batch is decoded


def _av_frames(path: Path, fps: float | None) -> Iterator[Frame]:
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise _Unreadable(_clean(error)) from error
    if not container.streams.video:
        audio = bool(container.streams.audio)
        container.close()
        raise VideoError(f"{path}: no video stream" + (" (audio only)" if audio else ""))
    stream = container.streams.video[0]
    yielded = False
    try:
        decoded = (Frame(upright(f), float(f.time or 0.0)) for f in container.decode(stream))
        for frame in (sample(decoded, fps) if fps else decoded):
            yielded = True
            yield frame
    except av.error.FFmpegError as error:
        if not yielded:
            raise _Unreadable(str(error)) from error
        raise VideoError(f"{path}: decoding failed after some frames: {error}") from error
    finally:
        container.close()
    if not yielded:
        raise _Unreadable("no frames")


def upright(frame) -> np.ndarray:
    """A PyAV frame as (H, W, 3) RGB, turned as its display matrix says (a phone video comes out upright,
    as FFmpeg shows it)."""
    image = frame.to_ndarray(format="rgb24")
    turns = round(getattr(frame, "rotation", 0) / 90) % 4  # degrees counter-clockwise
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _clean(error: BaseException) -> str:
    """A decoder's message without its log prefix ("[01:02:03] /its/build/src/file.cc:83: ") or extra lines."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    text = re.sub(r"^\[Errno -?\d+\] (.*?)(: '.*')?$", r"\1", text)  # PyAV's errno and file name
    return re.sub(r"^Check failed: .*?\) ", "", text).removeprefix("ERROR ").strip()


@contextmanager
def _quiet_stderr():
    """Sends what C libraries print on file descriptor 2 to /dev/null for the duration."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 16) -> Path:
    """Writes (T, H, W, 3) uint8 RGB frames as H.264 MP4 (PyAV's bundled libx264)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # mbtree off: with it, PyAV's libx264 reads memory it never wrote (its SIMD macroblock-tree code),
        # so the same frames encoded twice, in one process or two, came out different; without it the
        # file is the same bytes every time (see tests/test_sources.py)
        stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
