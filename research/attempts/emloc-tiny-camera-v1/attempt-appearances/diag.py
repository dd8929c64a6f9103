"""Layer-2 attention of a camera checkpoint at the --appearance-targets rows, on 8 held-out videos:

    python research/attempts/emloc-tiny-camera-v1/attempt-appearances/diag.py CHECKPOINT FRAMES

per head, the mass on the target positions and the cross-entropy from the target, and at the count
questions the sink's share (target 1 / (k + 1))."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "research"), str(ROOT)]

import train_tiny as T  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from emloc.tiny import WORDS, tiny_tokenizer  # noqa: E402
from stream.suites import camera as synthetic_camera  # noqa: E402

torch.set_num_threads(1)
path, frames = sys.argv[1], int(sys.argv[2])
tok = tiny_tokenizer(WORDS + list(synthetic_camera.WORDS))
model = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
b = T.Batcher(model, tok, describe=True, task=synthetic_camera, look=True, appearances="frame")
seeds = [1_000_000 + i for i in range(8)]
with torch.no_grad():
    inputs, targets, where, kinds = b(seeds, frames)
    labels, at, head, look, spread = inputs["cell_labels"]
    emb, ids, _, _, x = T.embed_inputs(model, inputs)
    cp = T.CopyAttention(model, x["attention_mask"], T.LOOK_LAYER)
    model.model.language_model(inputs_embeds=emb, **x)
    probs = cp(at, head)
    for h in range(4):
        sel = (head == h) & (look.sum(-1) > 0)
        mass = (probs * (look > 0)).sum(-1)[sel]
        ce = -(look * probs.clamp_min(1e-9).log()).sum(-1)[sel]
        print(f"head {h}: rows {int(sel.sum())} mass on target {mass.mean():.3f} ce {ce.mean():.3f}")
    sel = (head == 2) & (look.sum(-1) > 0)
    rows = sel.nonzero()
    start = int((ids[0] == model.config.video_token_id).nonzero()[0])
    for r, t in rows.tolist()[:8]:
        print("count row: target sink", round(float(look[r, t, start - 1]), 3),
              "got", round(float(probs[r, t, start - 1]), 3))
