"""A synthetic video for demos and tests: coloured shapes moving over a noisy background."""

from __future__ import annotations

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40)}


def moving_shapes(frames: int, height: int = 112, width: int = 112, seed: int = 0) -> np.ndarray:
    """(frames, height, width, 3) uint8: one square per colour, each drifting in its own direction."""
    rng = np.random.default_rng(seed)
    video = rng.integers(90, 140, (frames, height, width, 3), dtype=np.uint8)
    side = max(4, min(height, width) // 6)
    starts = rng.uniform(0, 1, (len(COLOURS), 2))
    speeds = rng.uniform(-0.02, 0.02, (len(COLOURS), 2))
    for t in range(frames):
        for (y0, x0), (vy, vx), colour in zip(starts, speeds, COLOURS.values()):
            y = int(((y0 + vy * t) % 1.0) * (height - side))
            x = int(((x0 + vx * t) % 1.0) * (width - side))
            video[t, y:y + side, x:x + side] = colour
    return video
