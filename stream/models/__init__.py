"""The shipped models: small Qwen2-VL checkpoints trained here on the generated suites (stream/suites/).

They install with the package (package data), so a plain `pip install` finds them as well as a checkout
does. Each folder's README.md says how it was trained and what it scores; research/ holds the training
code and the superseded checkpoints.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent
DEFAULT_MODEL = SHIPPED / "emloc-tiny-qwen2vl"  # the default of every command: the synthetic suite
CAMERA_MODEL = SHIPPED / "emloc-tiny-camera"  # the camera-like suite (demo --suite camera)
EXAMPLES_MODEL = SHIPPED / "emloc-tiny-examples"  # few-shot episodes (task packs)
