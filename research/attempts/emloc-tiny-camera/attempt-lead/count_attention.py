"""Where the count question reads (held-out videos): layer 2, head 2 at the end-of-video count's last token
(the head `--look --appearance-targets local` teaches a distribution: 1 / (k + 1) on the <|vision_start|>
sink and on each of the k onsets), its mass on the sink, on the onsets' lead cells (`--lead-cells`
labels) and elsewhere, per number of stars k:

    python research/attempts/emloc-tiny-camera/attempt-lead/count_attention.py CHECKPOINT [FRAMES] [VIDEOS]
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "research"), str(ROOT)]

import train_tiny as T  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from emloc.tiny import WORDS, tiny_tokenizer  # noqa: E402
from stream.suites import camera as synthetic_camera  # noqa: E402

path = sys.argv[1]
frames = int(sys.argv[2]) if len(sys.argv) > 2 else 256
videos = int(sys.argv[3]) if len(sys.argv) > 3 else 24
torch.set_num_threads(1)
model = Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
batcher = T.Batcher(model, tiny_tokenizer(WORDS + list(synthetic_camera.WORDS)), task=synthetic_camera, look=True,
                    appearances="local", lookback=True, lead_cells=True)
mass = defaultdict(list)  # k -> [(on the sink, on the lead cells)]
for lo in range(0, videos, 4):
    seeds = [1_000_000 + lo + i for i in range(4)]
    inputs, _, _, _ = batcher(seeds, frames, mid=False)
    inputs.pop("lookback", None)
    _, at, head, look, _ = inputs["cell_labels"]
    embeds, _, _, _, rest = T.embed_inputs(model, inputs)
    captured = T.LayerInput(model, T.LOOK_LAYER)
    with torch.no_grad():
        model.model.language_model(inputs_embeds=embeds, **rest)
        q, k = captured.queries_keys([2])
    mask = rest["attention_mask"]
    for b in range(len(seeds)):
        t = next(t for t in range(at.shape[1]) if int(head[b, t]) == 2)  # the count at the end
        row = int(at[b, t])
        scores = (q[b, 0, row] @ k[b, 0, :row + 1].T).float() * captured.layer.scaling
        probs = torch.softmax(scores.masked_fill(~mask[b, 0, row, :row + 1], float("-inf")), -1)
        target = look[b, t, :row + 1] > 0
        sink = int(target.nonzero()[0])
        mass[int(target.sum()) - 1].append((float(probs[sink]), float(probs[target].sum() - probs[sink])))
for stars in sorted(mass):
    m = torch.tensor(mass[stars])
    print(f"k={stars} ({len(m)} videos): sink {m[:, 0].mean():.3f} +- {m[:, 0].std():.3f} (target "
          f"{1 / (stars + 1):.3f}), lead cells {m[:, 1].mean():.3f}, elsewhere {1 - m.sum(1).mean():.3f}")
