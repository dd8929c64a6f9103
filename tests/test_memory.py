"""What made `run` hold gigabytes at real resolutions, each checked where it was fixed.
(The RSS of whole runs is measured by benchmarks/soak.py --video, not here.)"""

import shutil
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

from stream.chunker import Chunker
from stream.sources import Frame

ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


@ffmpeg
def test_decord_reader_does_not_decode_ahead_while_a_chunk_folds(tmp_path):
    """An open decord reader keeps decoding the rest of the file in the background after a
    batch (about 1.5 GB within two seconds at 640x360, a fold's time); the source must not
    keep one open between batches. Runs in a fresh process so its RSS is the reader's."""
    path = tmp_path / "360p.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
                    "-t", "60", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)],
                   check=True)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from stream.sources import VideoFile

        def rss():
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
            return int(line.split()[1]) / 1024

        frames = VideoFile({str(path)!r}, backend="decord").frames(fps=2.0)
        first = next(frames)  # one batch decoded; a fold would run now
        before = rss()
        time.sleep(2.0)
        print(rss() - before, sum(1 for _ in frames) + 1)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth, count = out.stdout.split()
    assert int(count) == 120  # every sampled frame still comes
    assert float(growth) < 150, f"RSS grew {float(growth):.0f} MiB while the source sat idle"


def test_chunker_holds_one_copy_of_the_frames():
    """Frames are copied into the chunk as they arrive, so neither the frames nor the decoder's
    batch arrays they view stay alive until the chunk is full (a second copy of the chunk:
    400 MB at 1080p)."""
    rng = np.random.default_rng(0)
    chunker = Chunker(4)
    pushed, alive = [], []
    for half in range(2):
        batch = rng.integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)  # a decoder's batch; frames view it
        alive.append(weakref.ref(batch))
        pushed.extend(batch.copy())
        chunk = [chunker.push(Frame(batch[i], (2 * half + i) / 2)) for i in range(2)][-1]
        del batch
        assert alive[-1]() is None  # its frames are in the chunker, the batch is gone
        if half == 0:
            assert chunk is None
            pending = chunker.pending()
            assert np.array_equal(pending.frames, np.stack(pushed)) and pending.times == [0.0, 0.5]
    assert np.array_equal(chunk.frames, np.stack(pushed)) and chunk.times == [0.0, 0.5, 1.0, 1.5]
    assert chunker.pending() is None and chunker.flush() is None


def test_vision_tower_in_pieces_equals_the_whole_chunk(model, tokenizer):
    """The vision tower runs a few temporal steps at a time; its attention never crosses a step,
    so the pieces must give the embeddings of one call over the whole chunk (both families:
    Qwen2.5-VL's windows and full-attention blocks included). Catches pieces cut inside a step
    or given the wrong grid."""
    import torch

    from emloc import adapter_for

    from .reference import random_frames

    adapter = adapter_for(model, tokenizer)
    pixels = adapter.preprocess(random_frames(8, 112, 84, seed=3))  # 4 steps of 8 x 6 patches
    whole = model.model.visual(pixels.pixel_values, grid_thw=torch.tensor([pixels.grid_thw])).pooler_output
    adapter.VISION_PATCHES_PER_CALL = 100  # two steps a call
    torch.testing.assert_close(adapter.encode_video(pixels)[0], whole, rtol=0, atol=1e-5)
    adapter.VISION_PATCHES_PER_CALL = 1  # one step a call
    torch.testing.assert_close(adapter.encode_video(pixels)[0], whole, rtol=0, atol=1e-5)
