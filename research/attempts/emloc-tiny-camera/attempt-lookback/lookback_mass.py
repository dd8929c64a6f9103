"""How much of layer 1's attention a checkpoint puts where `--lookback` teaches it to (held-out videos):

    python research/attempts/emloc-tiny-camera/attempt-lookback/lookback_mass.py CHECKPOINT [FRAMES] [VIDEOS]

Per head of `train_tiny.LOOKBACK_HEADS`: the mean attention mass on the targets, split by whether the
target is the sink (nothing seen yet / an onset) or earlier tokens.
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "research"), str(ROOT)]

import train_tiny as T  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from emloc.tiny import WORDS, tiny_tokenizer  # noqa: E402
from stream.suites import camera as synthetic_camera  # noqa: E402

path = sys.argv[1]
frames = int(sys.argv[2]) if len(sys.argv) > 2 else 64
videos = int(sys.argv[3]) if len(sys.argv) > 3 else 8
model = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
batcher = T.Batcher(model, tiny_tokenizer(WORDS + list(synthetic_camera.WORDS)), task=synthetic_camera, look=True,
                    appearances="local", lookback=True)
names = ("triangle so far", "other of square/circle", "star in previous pair")
mass = {(h, s): [] for h in range(3) for s in (True, False)}
for lo in range(0, videos, 4):
    inputs, _, _, _ = batcher([1_000_000 + lo + i for i in range(4)], frames, mid=False)
    start, queries, targets = inputs.pop("lookback")
    embeds, _, _, _, rest = T.embed_inputs(model, inputs)
    captured = T.LayerInput(model, T.LOOKBACK_LAYER)
    n = queries.shape[-1]
    with torch.no_grad():
        model.model.language_model(inputs_embeds=embeds, **rest)
        probs = captured.attention(rest["attention_mask"], T.LOOKBACK_HEADS, slice(start, start + n),
                                   slice(start - 1, start + n))
    on = (probs * targets).sum(-1)
    sink = targets[..., 0]
    for h in range(3):
        for s in (True, False):
            pick = queries[:, h] & (sink[:, h] == s)
            mass[h, s] += on[:, h][pick].tolist()
for h, name in enumerate(names):
    parts = [f"{'sink' if s else 'earlier'} {sum(mass[h, s]) / max(len(mass[h, s]), 1):.2f} ({len(mass[h, s])})"
             for s in (True, False)]
    print(f"head {T.LOOKBACK_HEADS[h]} {name}: mass on target: " + ", ".join(parts))
