"""Can the vision tower learn to tell the suite's shapes apart? Trains only the vision tower of a
checkpoint (the decoder untouched) with a linear shape head on its output, class-balanced (each shape
weighted by the inverse of its share of the labelled tokens) or plain, then scores per-shape recall on
held-out videos with the head it trained:

    python research/attempts/emloc-tiny-camera-v1/attempt-appearances/vision_shapes.py CHECKPOINT MINUTES [plain]
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "research"), str(ROOT)]

import train_tiny as T  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from emloc.adapters.qwen_vl import QwenVLAdapter  # noqa: E402
from emloc.tiny import WORDS, tiny_tokenizer  # noqa: E402
from stream.suites import camera as synthetic_camera  # noqa: E402

torch.manual_seed(0)
path, minutes = sys.argv[1], float(sys.argv[2])
balanced = len(sys.argv) < 4 or sys.argv[3] != "plain"
model = Qwen2VLForConditionalGeneration.from_pretrained(path)
T.batched_vision_attention(model)
adapter = QwenVLAdapter(model, tiny_tokenizer(WORDS + list(synthetic_camera.WORDS)))
visual = model.model.visual
head = torch.nn.Linear(model.config.text_config.hidden_size, len(T.CAMERA_SHAPES))
optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.01)


def batch(seeds, frames=32):
    pixels, labels = [], []
    for seed in seeds:
        video = synthetic_camera.make_video(seed, frames=frames)
        p = adapter.preprocess(video.frames)
        pixels.append(p)
        labels.append(T.camera_cell_labels(video, frames // 2, 16)[:, 0])
    out = visual(torch.cat([p.pixel_values for p in pixels]),
                 grid_thw=torch.tensor([p.grid_thw for p in pixels])).pooler_output
    return out, torch.cat(labels)


def recall(steps=4):
    hits, total = torch.zeros(len(T.CAMERA_SHAPES)), torch.zeros(len(T.CAMERA_SHAPES))
    with torch.no_grad():
        for lo in range(steps):
            out, y = batch([1_000_000 + 4 * lo + i for i in range(4)], 64)
            keep = y >= 0
            guess = head(out).argmax(-1)
            hits += torch.bincount(y[keep][guess[keep] == y[keep]], minlength=len(hits)).float()
            total += torch.bincount(y[keep], minlength=len(hits)).float()
    return ", ".join(f"{n} {h / max(t, 1):.2f}" for n, h, t in zip(T.CAMERA_SHAPES, hits.tolist(), total.tolist()))


started, step = time.time(), 0
counts = torch.ones(len(T.CAMERA_SHAPES))
while time.time() - started < 60 * minutes:
    out, y = batch([T.TRAIN_SEEDS + 70_000_000 + 8 * step + i for i in range(8)])
    counts += torch.bincount(y[y >= 0], minlength=len(counts)).float()
    weight = (counts.sum() / counts) / (counts.sum() / counts).mean() if balanced else None
    loss = F.cross_entropy(head(out), y, weight=weight, ignore_index=-100)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step += 1
    if step % 50 == 0:
        print(f"step {step} {(time.time() - started) / 60:.1f} min loss {loss.item():.3f}; recall {recall(2)}",
              flush=True)
print(f"done: {step} steps, {'balanced' if balanced else 'plain'}; held-out recall {recall()}", flush=True)
