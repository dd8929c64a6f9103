"""Synthetic long videos with checkable questions, for demos, tests, training and benchmarks.

A video is a grid of cells over a noisy, flickering grey background. The top-left
cell is a display showing a seven-segment digit that changes a few times; the other
cells host events, each lasting one frame pair (one temporal patch):

- one triangle, in one of six colours          -> needle:  "what colour was the triangle ?"
- a star, one to four times                    -> count:   "how many times did a star appear ?"
- one square and one circle, at different times -> order:  "which came first , the square or the circle ?"
- the digit on the display at the end          -> state:   "what digit is on screen now ?"

Answers come from a closed vocabulary and are scored by exact match. Everything is a
pure function of the seed, so a test set is a list of seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

CELL = 28  # one merged vision token of Qwen2-VL covers 28 x 28 pixels
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
           "yellow": (235, 220, 40), "purple": (150, 60, 200), "orange": (240, 140, 30)}
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION_TYPES = ("needle", "count", "order", "state")
PROBE = "Describe what happens in the video."

# seven-segment layout: a (top), b, c (right), d (bottom), e, f (left), g (middle)
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc",
            8: "abcdefg", 9: "abcdfg"}


@dataclass(frozen=True)
class Event:
    step: int  # temporal step (frame pair) the event is shown in
    shape: str
    colour: str
    cell: int


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


@dataclass
class SyntheticVideo:
    """frames: (T, H, W, 3) uint8 RGB at `fps`; events and digits in temporal steps."""

    seed: int
    frames: np.ndarray
    fps: float
    events: list[Event]
    digits: list[tuple[int, int]]  # (first step shown, digit)
    questions: list[Question] = field(default_factory=list)

    def question(self, kind: str) -> Question:
        return next(q for q in self.questions if q.kind == kind)

    def description(self) -> str:
        """The answer to the probe prompt: every slot the questions ask about, in a fixed order, so
        that a model's output on the probe depends on all of the video's content."""
        colour = {e.shape: e.colour for e in self.events if e.shape != "star"}
        stars = sum(1 for e in self.events if e.shape == "star")
        first = next(e.shape for e in self.events if e.shape in ("square", "circle"))
        return (f"triangle {colour['triangle']} square {colour['square']} circle {colour['circle']} "
                f"star {COUNT_WORDS[stars]} {first} first digit {COUNT_WORDS[self.digits[-1][1]]}")


def make_video(seed: int, frames: int = 256, size: int = 56, fps: float = 2.0, max_stars: int = 4,
               digit_changes: tuple[int, int] = (2, 5), needle_before: float | None = None) -> SyntheticVideo:
    """The video and its four questions for `seed`. `frames` must be even and >= 16.

    needle_before: if given, the triangle (the needle) is moved to a free step within this
        fraction of the video's start (e.g. 0.05: the first 5%); everything else is unchanged.
    """
    if frames < 16 or frames % 2:
        raise ValueError(f"a synthetic video needs an even number of frames >= 16, got {frames}")
    if size % CELL or size < 2 * CELL:
        raise ValueError(f"frame size must be a multiple of {CELL} and at least {2 * CELL}, got {size}")
    rng = np.random.default_rng(seed)
    steps, cells = frames // 2, (size // CELL) ** 2
    colours = list(COLOURS)

    stars = int(rng.integers(1, max_stars + 1))
    shapes = ["triangle", "square", "circle"] + ["star"] * stars
    when = rng.choice(steps, size=len(shapes), replace=False)
    if needle_before is not None:
        early = [t for t in range(max(1, int(needle_before * steps))) if t not in set(when[1:].tolist())]
        when[0] = int(np.random.default_rng([seed, 1]).choice(early))
    events = sorted((Event(int(t), s, colours[int(rng.integers(len(colours)))], int(rng.integers(1, cells)))
                     for t, s in zip(when, shapes)), key=lambda e: e.step)

    digits = digit_schedule(rng, steps, digit_changes)

    video = _render(rng, frames, size, events, digits)
    return SyntheticVideo(seed, video, fps, events, digits, four_questions(rng, events, stars, digits))


def digit_schedule(rng: np.random.Generator, steps: int, changes: tuple[int, int]) -> list[tuple[int, int]]:
    """(first step shown, digit) of the display: a digit from step 0, then `changes` (a range) new ones."""
    count = int(rng.integers(changes[0], changes[1] + 1))
    starts = [0] + sorted(int(x) for x in rng.choice(np.arange(1, steps), size=count, replace=False))
    digits, last = [], None
    for start in starts:
        digit = int(rng.choice([d for d in range(10) if d != last]))
        digits.append((start, digit))
        last = digit
    return digits


def four_questions(rng: np.random.Generator, events, stars: int, digits: list[tuple[int, int]]) -> list[Question]:
    """needle, count, order and state of a video (the order question names its two shapes in a random order)."""
    order = [e.shape for e in events if e.shape in ("square", "circle")]
    first_two = ["square", "circle"] if rng.random() < 0.5 else ["circle", "square"]
    triangle = next(e for e in events if e.shape == "triangle")
    return [
        Question("needle", "what colour was the triangle ?", triangle.colour),
        Question("count", "how many times did a star appear ?", COUNT_WORDS[stars]),
        Question("order", f"which came first , the {first_two[0]} or the {first_two[1]} ?", order[0]),
        Question("state", "what digit is on screen now ?", COUNT_WORDS[digits[-1][1]]),
    ]


def _render(rng: np.random.Generator, frames: int, size: int, events: list[Event],
            digits: list[tuple[int, int]]) -> np.ndarray:
    per_row = size // CELL
    base = rng.integers(95, 135)
    flicker = np.cumsum(rng.normal(0, 1.5, frames)).clip(-25, 25)  # a slowly drifting brightness
    video = (rng.integers(-20, 21, (frames, size, size, 3)) + base + flicker[:, None, None, None])
    video = video.clip(0, 255).astype(np.uint8)
    sprites = {}
    by_step = {e.step: e for e in events}
    digit_at = np.zeros(frames // 2, dtype=int)
    for start, digit in digits:
        digit_at[start:] = digit
    for step in range(frames // 2):
        t = 2 * step
        y, x = 0, 0  # the display cell
        video[t:t + 2, y:y + CELL, x:x + CELL] = _digit_sprite(int(digit_at[step]))
        event = by_step.get(step)
        if event is not None:
            key = (event.shape, event.colour)
            if key not in sprites:
                sprites[key] = _shape_sprite(event.shape, COLOURS[event.colour])
            sprite, mask = sprites[key]
            y, x = (event.cell // per_row) * CELL, (event.cell % per_row) * CELL
            region = video[t:t + 2, y:y + CELL, x:x + CELL]
            region[:, mask] = sprite[mask]
    return video


def _shape_sprite(shape: str, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    image = Image.new("L", (CELL, CELL), 0)
    draw = ImageDraw.Draw(image)
    lo, hi, mid = 3, CELL - 4, CELL // 2
    if shape == "triangle":
        draw.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=255)
    elif shape == "square":
        draw.rectangle([lo + 2, lo + 2, hi - 2, hi - 2], fill=255)
    elif shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=255)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, mid - lo, (mid - lo) * 0.42)
        draw.polygon([(mid + r * np.cos(a), mid - r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask = np.asarray(image) > 127
    sprite = np.zeros((CELL, CELL, 3), np.uint8)
    sprite[:] = colour
    return sprite, mask


def _digit_sprite(digit: int) -> np.ndarray:
    cell = np.full((CELL, CELL, 3), 20, np.uint8)
    w, lo, hi, left, right, mid = 3, 3, CELL - 4, 7, CELL - 8, CELL // 2
    bars = {"a": (lo, lo + w, left, right), "d": (hi - w, hi, left, right), "g": (mid - 1, mid + 2, left, right),
            "f": (lo, mid + 1, left, left + w), "b": (lo, mid + 1, right - w, right),
            "e": (mid, hi, left, left + w), "c": (mid, hi, right - w, right)}
    for segment in SEGMENTS[digit]:
        y0, y1, x0, x1 = bars[segment]
        cell[y0:y1, x0:x1] = 235
    return cell
