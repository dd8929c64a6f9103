"""Are the --appearance-targets features linearly readable from a frozen checkpoint? Trains fresh linear
probes (the model frozen) on training seeds and scores them on held-out ones, at 64 frames:

    python research/attempts/emloc-tiny-camera-v1/attempt-appearances/features.py CHECKPOINT [STEPS]

star shown (vision output), onset, which came first, triangle's middle passed (middle layer), and the
local variants (a star on this token; on star tokens, its first frame pair), each against its majority
baseline."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "research"), str(ROOT)]

import train_tiny as T  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from emloc.tiny import WORDS, tiny_tokenizer  # noqa: E402
from stream.suites import camera as synthetic_camera  # noqa: E402

torch.manual_seed(0)
path, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 60
tok = tiny_tokenizer(WORDS + list(synthetic_camera.WORDS))
model = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
batcher = T.Batcher(model, tok, task=synthetic_camera)
COLUMNS = {"shape (control)": (0, "vision"), "star shown": (7, "vision"), "onset": (8, "middle"),
           "which first": (9, "middle"),
           "middle passed": (10, "middle"), "star here (local)": (11, "vision"), "onset (local)": (12, "middle")}


@torch.no_grad()
def features(seeds):
    inputs, _, _, _ = batcher(seeds, 64, mid=False)
    embeds, ids, video, labels, inputs = T.embed_inputs(model, inputs)
    out = model.model.language_model(inputs_embeds=embeds, output_hidden_states=True, **inputs)
    middle = out.hidden_states[len(out.hidden_states) // 2][ids == model.config.video_token_id]
    return dict(vision=video, middle=middle), labels


probes = {name: torch.nn.Linear(model.config.text_config.hidden_size, len(T.CAMERA_SHAPES)) for name in COLUMNS}
optimizer = torch.optim.Adam([p for probe in probes.values() for p in probe.parameters()], lr=3e-3)
for step in range(steps):
    x, labels = features([T.TRAIN_SEEDS + 50_000_000 + 4 * step + i for i in range(4)])
    # every probe weighs its classes alike (a plain mean ignores a class as rare as the stars)
    loss = sum(F.cross_entropy(probes[n](x[where]), labels[:, c], ignore_index=-100,
                               weight=T.balanced_weights(labels[:, c], len(T.CAMERA_SHAPES)))
               for n, (c, where) in COLUMNS.items())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
right = {n: [0, 0, 0] for n in COLUMNS}  # correct, majority-correct, total
recall = torch.zeros(2, len(T.CAMERA_SHAPES))  # the control's hits and tokens per shape
for lo in range(0, 16, 4):
    x, labels = features([1_000_000 + lo + i for i in range(4)])
    for n, (c, where) in COLUMNS.items():
        y, keep = labels[:, c], labels[:, c] >= 0
        guess = probes[n](x[where]).argmax(-1)
        right[n][0] += int((guess == y)[keep].sum())
        right[n][1] += int((y[keep] == torch.mode(y[keep]).values).sum())
        right[n][2] += int(keep.sum())
        if c == 0:
            recall[0] += torch.bincount(y[keep][guess[keep] == y[keep]], minlength=len(T.CAMERA_SHAPES))
            recall[1] += torch.bincount(y[keep], minlength=len(T.CAMERA_SHAPES))
for n, (a, m, t) in right.items():
    print(f"{n}: probe {a / t:.3f}, majority {m / t:.3f} ({t} tokens)")
print("shape recall:", ", ".join(f"{name} {h / max(t, 1):.2f} ({int(t)})" for name, h, t
                                  in zip(T.CAMERA_SHAPES, recall[0].tolist(), recall[1].tolist())))
