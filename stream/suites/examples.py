"""Few-shot episodes with fresh labels: the task that shows whether a model learns from examples.

An episode names a handful of object classes (a shape in a colour: 4 shapes x 6 colours = 24
classes) with words drawn afresh for that episode from a pool of nonsense words (`LABELS`), so
the same red triangle is a "dax" in one episode and a "wug" in the next: only the episode's
examples can tell the answer, zero-shot accuracy is chance, and anything above it is learning
from the examples (EMLoC's many-shot adaptation; issue 12).

- an example: a picture (two identical 56 x 56 frames: one frame pair, as Qwen2-VL reads an
  image) of one object of the episode on a noisy grey background, the question
  `what is this ?` and its answer, the class's word;
- a query: a short clip (one to four frame pairs) of one object of the episode, somewhere
  else in the frame, over fresh noise; the same question.

Everything is a pure function of the seed. Training uses seeds from 10,000,000 upwards,
evaluation and benchmarks seeds from 1,000,000 (as for the video tasks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synthetic import CELL, COLOURS, _shape_sprite

SHAPES = ("triangle", "square", "circle", "star")
QUESTION = "what is this ?"
# words no other task uses (and no English the model knows): a fresh name per class per episode
LABELS = ("dax", "wug", "blicket", "toma", "fep", "zup", "kiki", "bouba", "modi", "gazzer", "tufa", "lorp",
          "pilk", "snarb", "vorp", "glim", "yarf", "quib", "tesk", "numo")
WORDS = ("this",) + LABELS  # words this task adds to the synthetic task's vocabulary


@dataclass(frozen=True)
class Example:
    """frames: (T, H, W, 3) uint8 (T = 2 for a picture); label: the answer word; cls: (shape, colour)."""

    frames: np.ndarray
    label: str
    cls: tuple[str, str]
    question: str = QUESTION


@dataclass
class Episode:
    seed: int
    classes: list[tuple[str, str]]
    names: dict[tuple[str, str], str]
    examples: list[Example]
    queries: list[Example]


def all_classes() -> list[tuple[str, str]]:
    return [(shape, colour) for shape in SHAPES for colour in COLOURS]


def make_episode(seed: int, examples: int = 32, classes: int = 8, queries: int = 4, size: int = 56,
                 query_steps: tuple[int, int] = (1, 4)) -> Episode:
    """`examples` labelled pictures of `classes` classes (each class shown at least once while there
    are as many examples as classes, then drawn at random) and `queries` clips of classes shown in
    the examples (or of any of the episode's classes when there are no examples)."""
    if not 1 <= classes <= min(len(LABELS), len(all_classes())):
        raise ValueError(f"an episode has 1..{len(LABELS)} classes, got {classes}")
    rng = np.random.default_rng([seed, 12])
    pool = all_classes()
    chosen = [pool[i] for i in rng.choice(len(pool), size=classes, replace=False)]
    names = dict(zip(chosen, (str(w) for w in rng.choice(LABELS, size=classes, replace=False))))
    order = list(rng.permutation(classes)) if examples >= classes else []
    order += [int(c) for c in rng.integers(0, classes, size=max(0, examples - len(order)))]
    order = order[:examples]
    shown = sorted({chosen[i] for i in order}) or chosen
    made = [Example(picture(rng, chosen[i], size), names[chosen[i]], chosen[i]) for i in order]
    asked = [shown[int(i)] for i in rng.integers(0, len(shown), size=queries)]
    clips = [Example(clip(rng, c, int(rng.integers(query_steps[0], query_steps[1] + 1)), size), names[c], c)
             for c in asked]
    return Episode(seed, chosen, names, made, clips)


def picture(rng: np.random.Generator, cls: tuple[str, str], size: int = 56) -> np.ndarray:
    """One object of class `cls` in a random cell, as one frame pair (2 identical frames)."""
    return clip(rng, cls, 1, size, still=True)


def clip(rng: np.random.Generator, cls: tuple[str, str], steps: int, size: int = 56,
         still: bool = False) -> np.ndarray:
    """`steps` frame pairs of fresh noise with the object in a random cell (a new cell every pair
    unless `still`; a still clip repeats one frame)."""
    shape, colour = cls
    sprite, mask = _shape_sprite(shape, COLOURS[colour])
    per_row = size // CELL
    frames = 2 * steps
    base = int(rng.integers(95, 135))
    video = (rng.integers(-20, 21, (frames, size, size, 3)) + base).clip(0, 255).astype(np.uint8)
    if still:
        video[1:] = video[0]
    cell = int(rng.integers(per_row * per_row))
    for step in range(steps):
        if step and not still:
            cell = int(rng.integers(per_row * per_row))
        y, x = (cell // per_row) * CELL, (cell % per_row) * CELL
        region = video[2 * step:2 * step + 2, y:y + CELL, x:x + CELL]
        region[:, mask] = sprite[mask]
    return video
