"""Train the offline default model: a small Qwen2-VL (the real classes) on the synthetic task.

    python research/train_tiny.py --out stream/models/emloc-tiny-qwen2vl        # about 60 minutes on 2 CPU cores
    python research/train_tiny.py --task camera --init stream/models/emloc-tiny-qwen2vl \
        --out stream/models/emloc-tiny-camera ...

--task synthetic (the default) is the task of stream/suites/synthetic.py, the recipe of
stream/models/emloc-tiny-qwen2vl; --task camera the camera-like suite of stream/suites/camera.py
(112x112 frames over real footage, five question types), the recipe of stream/models/emloc-tiny-camera
(see its model card for the exact command).

Recipe (see the model card the script writes): random init, AdamW with warm-up and cosine
decay, loss on the answer token only, a curriculum over video length that moves on only
once the held-out accuracy at the current length is high, and the best checkpoint (by
held-out accuracy at the longest length reached) kept. Training seeds and evaluation seeds
come from disjoint ranges; the benchmark and tests use seeds >= 1_000_000.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402

from emloc.adapters.qwen_vl import QwenVLAdapter  # noqa: E402
from emloc.tiny import WORDS, tiny_tokenizer  # noqa: E402
from stream.suites import camera as synthetic_camera  # noqa: E402
from stream.suites import examples as synthetic_examples
from stream.suites import synthetic
from stream.suites.synthetic import COLOURS, COUNT_WORDS, PROBE  # noqa: E402

SYSTEM = "You are a helpful assistant."
TRAIN_SEEDS = 10_000_000  # training videos use seeds from here upwards; evaluation uses 1_000_000+
TASKS = {"synthetic": synthetic, "camera": synthetic_camera, "examples": synthetic_examples}


def build_model(tokenizer, args) -> Qwen2VLForConditionalGeneration:
    get = tokenizer.convert_tokens_to_ids
    ids = dict(image_token_id=get("<|image_pad|>"), video_token_id=get("<|video_pad|>"),
               vision_start_token_id=get("<|vision_start|>"), vision_end_token_id=get("<|vision_end|>"),
               bos_token_id=get("<|endoftext|>"), eos_token_id=get("<|im_end|>"), pad_token_id=get("<|endoftext|>"))
    head_dim = args.hidden // args.heads
    half = head_dim // 2
    spatial = half * 3 // 8
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [half - 2 * spatial, spatial, spatial]}, **ids),
        vision_config=dict(depth=args.vision_depth, embed_dim=args.vision_dim, num_heads=4, hidden_size=args.hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=4),
        **ids)
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return Qwen2VLForConditionalGeneration(config)


class Batcher:
    """Turns seeds into model inputs laid out exactly as the runtime lays them out (same adapter,
    same positions), with several question branches after one video.

    Each branch sees the preamble and the video (up to its cut) but not the other branches,
    as separate questions over one cache do. The end branches ask the four questions after
    the whole video, plus the colour of the square and of the circle (more signal for binding
    shapes to colours); the mid branches ask count and state after a random cut. Every branch
    ends with its answer token, which must be followed by <|im_end|>, so the model stops.
    """

    def __init__(self, model, tokenizer, describe: bool = False, task=synthetic, look: bool = False,
                 look_first: bool = False, appearances: str | None = None, lookback: bool = False,
                 lead_cells: bool = False) -> None:
        self.describe = describe
        self.look, self.look_first, self.appearances = look, look_first, appearances
        self.lookback, self.lead_cells = lookback, lead_cells
        self.task = task
        self.adapter = QwenVLAdapter(model, tokenizer)
        self.tokenizer = tokenizer
        self.preamble = self.adapter.preamble_ids(SYSTEM)
        self.video_token = model.config.video_token_id
        self.stop = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, seeds: list[int], frames: int, mid: bool = True):
        rows = [self._sample(seed, frames, mid) for seed in seeds]
        ids = torch.stack([r[0] for r in rows])
        positions = torch.stack([r[1] for r in rows], dim=1)
        mask = torch.stack([r[2] for r in rows]).unsqueeze(1)
        pixels = torch.cat([r[3] for r in rows])
        grids = torch.tensor([r[4] for r in rows])
        # first the answer's first token at each branch's last question token (evaluation reads these),
        # then every later answer token and the stop after the answer
        targets = torch.stack([torch.tensor([t for t, _ in r[5]] + [t for t, _ in r[6]]) for r in rows])
        where = torch.stack([torch.tensor([w for _, w in r[5]] + [w for _, w in r[6]]) for r in rows])
        kinds = rows[0][7]
        labels = torch.cat([r[8] for r in rows])  # (all vision tokens, 3): shape, colour, digit
        if self.task is synthetic_camera and self.look:
            labels = (labels, *_pad_looks([r[9] for r in rows], ids.shape[1]))
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values_videos=pixels,
                      video_grid_thw=grids, cell_labels=labels)
        if self.task is synthetic_camera and self.lookback:
            inputs["lookback"] = (len(self.preamble), torch.stack([r[10][0] for r in rows]),
                                  torch.stack([r[10][1] for r in rows]))
        return inputs, targets, where, kinds

    def _sample(self, seed: int, frames: int, mid: bool):
        video = self.task.make_video(seed, frames=frames)
        pixels = self.adapter.preprocess(video.frames)
        steps, per_step = pixels.grid_thw[0], tokens_per_step(pixels)
        start = len(self.preamble)
        video_pos = self.adapter.video_positions(start, 0, pixels)
        pieces = [self.preamble, torch.full((steps * per_step,), self.video_token)]
        positions = [self.adapter.text_positions(0, start), video_pos]
        branches = [(kind, video.question(kind).text, video.question(kind).answer, steps)
                    for kind in self.task.QUESTION_TYPES]
        if mid:
            for shape in ("square", "circle"):
                colour = next(e.colour for e in video.events if e.shape == shape)
                branches.append((f"colour:{shape}", f"what colour was the {shape} ?", colour, steps))
            rng = np.random.default_rng(seed + 1)
            cut = int(rng.integers(max(2, steps // 4), steps))
            stars = sum(1 for e in video.events if e.shape == "star" and _start(e) < cut)
            digit = [d for s, d in video.digits if s < cut][-1]
            branches += [("count@cut", video.question("count").text, COUNT_WORDS[stars], cut),
                         ("state@cut", video.question("state").text, COUNT_WORDS[digit], cut)]
        if self.describe:
            branches.append(("describe", PROBE, video.description(), steps))
        spans, heads, rest = [], [], []
        length = start + steps * per_step
        for _kind, text, answer, cut in branches:
            answer_ids = self.tokenizer.convert_tokens_to_ids(answer.split())
            question = self.adapter.question_ids(text)
            q = torch.cat([question, torch.tensor(answer_ids)])
            first = int(video_pos[:, :cut * per_step].max()) + 1
            pieces.append(q)
            positions.append(self.adapter.text_positions(first, len(q)))
            spans.append((length, length + len(q), cut))
            last = length + len(question) - 1  # predicts the answer's first token
            heads.append((answer_ids[0], last))
            rest += [(t, last + 1 + j) for j, t in enumerate(answer_ids[1:] + [self.stop])]
            length += len(q)
        mask = torch.zeros(length, length, dtype=torch.bool)
        context = start + steps * per_step
        mask[:context, :context] = _causal(context)
        for lo, hi, cut in spans:
            mask[lo:hi, :start + cut * per_step] = True
            mask[lo:hi, lo:hi] = _causal(hi - lo)
        labels = (camera_cell_labels(video, steps, per_step, lead=self.lead_cells) if self.task is synthetic_camera
                  else cell_labels(video, steps, per_step))
        looks = (_camera_looks(labels, branches, [last for _, last in heads], start, per_step, self.look_first,
                               self.appearances, order_both=self.lookback)
                 if self.task is synthetic_camera and self.look else None)
        backs = (lookback_targets(labels, per_step, self.lead_cells) if self.task is synthetic_camera and self.lookback
                 else None)
        return (torch.cat(pieces), torch.cat(positions, dim=1), mask, pixels.pixel_values, pixels.grid_thw,
                heads, rest, [b[0] for b in branches], labels, looks, backs)


class ExampleBatcher:
    """Few-shot episodes (stream/suites/examples.py) laid out as a task pack lays them out: the
    preamble, then each example as a picture followed by `adapter.example_ids` (question, answer,
    next user turn), then query branches (a clip and the question) that each see the examples but
    not each other. Targets: every query's answer and the stop after it (read first), and the answer
    of every example whose class an earlier example already named (dense in-context supervision;
    the first example of a class cannot be known and is not a target). Training-only probe labels
    (`cell_labels`): the class of the picture at each example's last question token, at its answer
    token and at each query's last token, read by `ClassProbe` after the second decoder layer:
    the features an induction circuit matches on (without them the loss sat at chance for 500 steps)."""

    task = synthetic_examples

    def __init__(self, model, tokenizer, queries: int = 4, classes: tuple[int, int] = (2, 10)) -> None:
        self.adapter = QwenVLAdapter(model, tokenizer)
        self.tokenizer = tokenizer
        self.preamble = self.adapter.preamble_ids(SYSTEM)
        self.video_token = model.config.video_token_id
        self.stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.queries, self.classes = queries, classes

    def __call__(self, seeds: list[int], examples: int, mid: bool = True, query_steps: int | None = None,
                 classes: int | None = None):
        rng = np.random.default_rng(seeds[0])
        steps = query_steps or int(rng.integers(1, 5))
        rows = []
        for seed in seeds:
            n = classes or int(np.random.default_rng([seed, 3]).integers(self.classes[0], self.classes[1] + 1))
            episode = synthetic_examples.make_episode(seed, examples=examples, classes=n, queries=self.queries,
                                                      query_steps=(steps, steps))
            rows.append(self._sample(episode))
        ids = torch.stack([r[0] for r in rows])
        positions = torch.stack([r[1] for r in rows], dim=1)
        mask = torch.stack([r[2] for r in rows]).unsqueeze(1)
        pixels = torch.cat([p for r in rows for p in r[3]])
        grids = torch.tensor([g for r in rows for g in r[4]])
        width = max(len(r[5]) for r in rows)
        targets = torch.tensor([[t for t, _ in r[5]] + [-100] * (width - len(r[5])) for r in rows])
        where = torch.tensor([[w for _, w in r[5]] + [0] * (width - len(r[5])) for r in rows])
        probed = torch.tensor([[c for c, _ in r[6]] for r in rows])  # same count in every row of a batch
        probed_at = torch.tensor([[w for _, w in r[6]] for r in rows])
        width = max(len(r[7][0]) for r in rows)
        copy_at = torch.zeros(len(rows), width, dtype=torch.long)
        copy = torch.zeros(len(rows), width, ids.shape[1], dtype=torch.bool)
        for b, r in enumerate(rows):
            copy_at[b, :len(r[7][0])], copy[b, :len(r[7][0])] = r[7]
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values_videos=pixels,
                      video_grid_thw=grids, cell_labels=(probed, probed_at, copy_at, copy))
        return inputs, targets, where, ["query"] * self.queries

    def _picture(self, frames, start: int):
        pixels = self.adapter.preprocess(frames)
        positions = self.adapter.video_positions(start, 0, pixels)
        return pixels, positions, torch.full((positions.shape[1],), self.video_token)

    def _sample(self, episode):
        words = self.tokenizer.convert_tokens_to_ids
        pieces, positions, pixels, grids = [self.preamble], [self.adapter.text_positions(0, len(self.preamble))], [], []
        length = next_position = len(self.preamble)
        named, later, probed = set(), [], []
        answers: list[tuple[tuple[str, str], int]] = []  # (class, position of its answer token), in order
        copies: list[tuple[int, list[int]]] = []  # (target position, answer tokens of earlier same-class examples)
        classes = synthetic_examples.all_classes()
        for example in episode.examples:
            px, pos, ids = self._picture(example.frames, next_position)
            tail = self.adapter.example_ids(example.question, example.label)
            label_at = length + len(ids) + len(self.adapter.question_ids(example.question)) - 1
            if example.cls in named:
                later.append((words(example.label), label_at))
                copies.append((label_at, [p for c, p in answers if c == example.cls]))
            answers.append((example.cls, label_at + 1))
            probed += [(classes.index(example.cls), label_at), (classes.index(example.cls), label_at + 1)]
            named.add(example.cls)
            first = int(pos.max()) + 1
            pieces += [ids, tail]
            positions += [pos, self.adapter.text_positions(first, len(tail))]
            pixels.append(px.pixel_values)
            grids.append(px.grid_thw)
            length += len(ids) + len(tail)
            next_position = first + len(tail)
        context = length
        heads, stops, spans = [], [], []
        for query in episode.queries:
            px, pos, ids = self._picture(query.frames, next_position)
            question = self.adapter.question_ids(query.question)
            branch = torch.cat([ids, question, torch.tensor([words(query.label)])])
            first = int(pos.max()) + 1
            pieces.append(branch)
            positions += [pos, self.adapter.text_positions(first, len(question) + 1)]
            pixels.append(px.pixel_values)
            grids.append(px.grid_thw)
            last = length + len(ids) + len(question) - 1
            heads.append((words(query.label), last))
            probed.append((classes.index(query.cls), last))
            copies.append((last, [p for c, p in answers if c == query.cls]))
            stops.append((self.stop, last + 1))
            spans.append((length, length + len(branch)))
            length += len(branch)
        mask = torch.zeros(length, length, dtype=torch.bool)
        mask[:context, :context] = _causal(context)
        for lo, hi in spans:
            mask[lo:hi, :context] = True
            mask[lo:hi, lo:hi] = _causal(hi - lo)
        copy = torch.zeros(len(copies), length, dtype=torch.bool)
        for row, (_, sources) in enumerate(copies):
            copy[row, sources] = True
        return (torch.cat(pieces), torch.cat(positions, dim=1), mask, pixels, grids, heads + stops + later, probed,
                (torch.tensor([t for t, _ in copies]), copy))


_CAUSAL = torch.ones(1, 1, dtype=torch.bool)


def tokens_per_step(pixels) -> int:
    """Merged vision tokens per frame pair of preprocessed frames (4 patches merge into one token)."""
    return pixels.pixel_values.shape[0] // 4 // pixels.grid_thw[0]


def _causal(n: int) -> torch.Tensor:
    """(n, n) lower-triangular boolean mask, sliced from one built once (tril is slow to rebuild each time)."""
    global _CAUSAL
    if len(_CAUSAL) < n:
        _CAUSAL = torch.ones(2 * n, 2 * n, dtype=torch.bool).tril()
    return _CAUSAL[:n, :n]


def _start(event) -> int:
    return event.start if hasattr(event, "start") else event.step


SHAPES = ["none", "triangle", "square", "circle", "star", "display"]


def cell_labels(video, steps: int, per_step: int) -> torch.Tensor:
    """(steps * per_step, 5) labels of each vision token's cell: shape, colour (0 = none), digit (-100 = none),
    and whether the square / the circle was shown at an earlier step (the features an order question needs)."""
    labels = torch.zeros(steps, per_step, 5, dtype=torch.long)
    labels[:, :, 2] = -100
    labels[:, 0, 0] = SHAPES.index("display")
    digit = 0
    starts = dict(video.digits)
    colours = list(COLOURS)
    for step in range(steps):
        digit = starts.get(step, digit)
        labels[step, 0, 2] = digit
    for event in video.events:
        labels[event.step, event.cell, :3] = torch.tensor([SHAPES.index(event.shape), 1 + colours.index(event.colour),
                                                          -100])
        if event.shape in ("square", "circle"):
            labels[event.step + 1:, :, 3 if event.shape == "square" else 4] = 1
    return labels.reshape(-1, 5)


CAMERA_SHAPES = SHAPES + ["distractor"]


def camera_cell_labels(video, steps: int, per_step: int, cover: float = 0.25, lead: bool = False) -> torch.Tensor:
    """(steps * per_step, 13) labels of each vision token of the camera suite: shape, colour, digit of what
    covers at least `cover` of its 28 x 28 cell (-100 where something covers less, ignored), whether the
    square / the circle appeared at an earlier step (from the step after its appearance ends), how many
    stars have appeared so far (0..4), and how long the video has run, in half-octaves of frame pairs
    (floor(2 log2(step + 1)), 0..15: read by `--elapsed-probe`). Columns 7-10, read by
    `--appearance-targets` (a feature constant over one appearance, which an attention lookup turns into
    the answer): a star is shown in this frame pair; this frame pair is a star's first (an onset: a
    count is the number of onsets); on the square's and circle's own tokens, which of the two came first
    (0 square, 1 circle; -100 elsewhere); and in halves (0, 1, 2) how far the triangle's middle has
    passed, clamp(step + 1 - middle, 0, 1): its mean over the video is 1 - middle / steps, the *when*.
    Columns 11-12, the same for stars on their own tokens (`--appearance-targets local`): a star covers
    some of this cell; on those cells, this is the star's first frame pair (1) or a later one (0),
    -100 on every other cell. With `lead` (`--lead-cells`): a star covers this cell solidly (at least
    half as much of it as of the cell it covers most in that frame pair); on those cells, 1 only on the
    onset's lead cell (the first solid cell, in reading order, of the star's first frame pair), so a
    count is the number of lead cells whatever a star's size (a star touches 4 to 9 cells)."""
    owner = torch.from_numpy(video.owner.astype(np.int64))  # (steps, H, W)
    side = int(round(per_step ** 0.5))
    cell = owner.shape[1] // side
    objects = list(video.events) + list(video.distractors)
    owners = 2 + len(objects)
    slot = torch.arange(steps * per_step).reshape(steps, side, 1, side, 1) * owners
    counts = torch.bincount((slot + owner.reshape(steps, side, cell, side, cell)).flatten(),
                            minlength=steps * per_step * owners)
    share = counts.reshape(steps, per_step, owners).float() / cell ** 2  # (steps, cells, owners)
    covered, top = share[..., 1:].max(-1)
    top = top + 1
    labels = torch.zeros(steps, per_step, 13, dtype=torch.long)
    labels[..., 12] = -100
    labels[..., 2] = -100
    labels[..., 6] = (2 * torch.log2(torch.arange(steps) + 1.0)).floor().long().clamp_max(15).unsqueeze(-1)
    colours = list(COLOURS)
    shape_of = ([0, CAMERA_SHAPES.index("display")] + [CAMERA_SHAPES.index(e.shape) for e in video.events]
                + [CAMERA_SHAPES.index("distractor")] * len(video.distractors))
    colour_of = [0, 0] + [1 + colours.index(o.colour) for o in objects]
    shape_of, colour_of = torch.tensor(shape_of), torch.tensor(colour_of)
    strong, weak = covered >= cover, (covered > 0) & (covered < cover)
    labels[..., 0] = torch.where(strong, shape_of[top], 0)
    labels[..., 1] = torch.where(strong, colour_of[top], 0)
    labels[..., 0][weak] = -100
    labels[..., 1][weak] = -100
    digit = torch.zeros(steps, dtype=torch.long)
    for start, d in video.digits:
        digit[start:] = d
    labels[:, 0, 2] = digit  # the display covers the first cell whole
    circle_first = int(video.question("order").answer == "circle")
    labels[..., 9] = torch.where(labels[..., 0] == CAMERA_SHAPES.index("square"), circle_first, -100)
    labels[..., 9][labels[..., 0] == CAMERA_SHAPES.index("circle")] = circle_first
    for index, event in enumerate(video.events):
        if event.shape == "star":
            mine = share[event.start:event.end, :, 2 + index]  # (its steps, cells)
            cells = (mine > 0) & (mine >= 0.5 * mine.amax(-1, keepdim=True)) if lead else mine > 0
            labels[event.start:event.end, :, 11] |= cells.long()
            labels[event.start:event.end, :, 12][cells] = 0
            onset = cells[0].clone()
            if lead:  # only the first solid cell, in reading order
                onset[int(onset.nonzero()[0]) + 1:] = False
            labels[event.start, :, 12][onset] = 1
        if event.shape in ("square", "circle"):
            labels[event.end:, :, 3 if event.shape == "square" else 4] = 1
        elif event.shape == "star":
            labels[event.start:, :, 5] += 1
            labels[event.start:event.end, :, 7] = 1
            labels[event.start, :, 8] = 1
        elif event.shape == "triangle":
            passed = (torch.arange(steps) + 1.0 - (event.start + event.steps / 2)).clamp(0, 1)
            labels[..., 10] = (2 * passed).round().long().unsqueeze(-1)
    return labels.reshape(-1, 13)


# Where the question's last token should look (training-only attention targets for --task camera --look):
# the objects a question is about, read by head 0 of layer LOOK_LAYER; the latest frame pair (the running
# star count, the display) by head 1. Without them the question-dependent types stayed at chance.
LOOK_LAYER = 2
LOOK_OBJECTS = {"needle": ("triangle",), "when": ("triangle",), "order": ("square", "circle"),
                "colour:square": ("square",), "colour:circle": ("circle",)}
LOOK_LATEST = {"count": "all", "count@cut": "all", "state": "display", "state@cut": "display"}
LOOK_FIRST = {"order"}  # with --look-first: only the shape that came first (the answer is then its identity)
# With --appearance-targets: count reads the star onsets with head 2 as a distribution (1 / (k + 1) on the
# <|vision_start|> sink and on each of k onset frame pairs: the sink's share says k), when reads the
# "triangle's middle has passed" column evenly over the video with head 3 (heads 2-3 share the other KV
# head than the object lookups, whose values carry colour and digit).
LOOK_ONSETS = {"count", "count@cut"}
LOOK_EVENLY = {"when"}


def _camera_looks(labels: torch.Tensor, branches: list, lasts: list[int], start: int, per_step: int,
                  first: bool = False, appearances: str | None = None, order_both: bool = False) -> list:
    """[(question's last position, head, vision positions to look at, their weights or None)] for the
    branches that have a target; weights (summing to 1) make the target a distribution, None a mass.
    appearances "frame": count reads every token of each onset frame pair, "local" only the star's own
    tokens there, or its lead cell (`--lead-cells`) (and order, as with `first`, only the shape shown first)."""
    shape = labels[:, 0].reshape(-1, per_step)
    onset_tokens = (labels[:, 12] == 1) if appearances == "local" else (labels[:, 8] == 1)
    onset_tokens = onset_tokens.reshape(-1, per_step)
    first = (first or appearances == "local") and not order_both
    looks = []
    for (kind, _, _, cut), last in zip(branches, lasts):
        if appearances and kind in LOOK_ONSETS:
            steps = onset_tokens[:cut].any(-1).nonzero().flatten()
            share = 1.0 / (len(steps) + 1)
            where, weights = [start - 1], [share]
            for step in steps.tolist():
                cells = onset_tokens[step].nonzero().flatten()
                where += (start + step * per_step + cells).tolist()
                weights += [share / len(cells)] * len(cells)
            looks.append((last, 2, where, weights))
            continue
        if appearances and kind in LOOK_EVENLY:
            n = cut * per_step
            looks.append((last, 3, list(range(start, start + n)), [1.0 / n] * n))
            continue
        if kind in LOOK_OBJECTS:
            wanted = torch.tensor([CAMERA_SHAPES.index(s) for s in LOOK_OBJECTS[kind]])
            if first and kind in LOOK_FIRST and appearances != "frame":
                shown = torch.isin(shape[:cut], wanted)
                if shown.any():
                    wanted = shape[:cut][shown][:1]  # row-major: the earliest step's shape
            hit = torch.isin(shape[:cut], wanted).flatten().nonzero().flatten()
            head = 0
        elif kind in LOOK_LATEST:
            hit = torch.arange(per_step) if LOOK_LATEST[kind] == "all" else torch.tensor([0])
            hit = hit + (cut - 1) * per_step
            head = 1
        else:
            continue
        if len(hit):
            looks.append((last, head, (start + hit).tolist(), None))
    return looks


def _pad_looks(rows: list[list], length: int):
    """Batch the looks: (B, T) positions, (B, T) heads, (B, T, L) targets (padding rows have no target):
    bool where every row is a mass target, else float weights with (B, T) bool "is a distribution"."""
    width = max(1, max(len(r) for r in rows))
    at = torch.zeros(len(rows), width, dtype=torch.long)
    head = torch.zeros(len(rows), width, dtype=torch.long)
    look = torch.zeros(len(rows), width, length)
    spread = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        for t, (last, h, where, weights) in enumerate(row):
            at[b, t], head[b, t] = last, h
            look[b, t, where] = 1.0 if weights is None else torch.tensor(weights)
            spread[b, t] = weights is not None
    return (at, head, look > 0) if not spread.any() else (at, head, look, spread)


def attention_target_loss(probs: torch.Tensor, targets: torch.Tensor, spread: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Averaged over the rows that have a target (padding rows, or no earlier example, have none): -log of
    the attention mass (probs: B, T, L) on the target positions (targets: B, T, L, bool or weights), or,
    for the rows where `spread` (B, T) is set, the cross-entropy from the target distribution (weights)."""
    has = (targets > 0).any(-1)
    loss = -((probs * (targets > 0)).sum(-1).clamp_min(1e-6).log())
    if spread is not None:
        loss = torch.where(spread, -(targets * probs.clamp_min(1e-9).log()).sum(-1), loss)
    return loss[has].mean()


# With --lookback (--task camera): training-only attention targets on the video tokens themselves, at
# decoder layer LOOKBACK_LAYER, that write each appearance feature where the question later reads it:
# head 2 at every video token looks at the triangle's tokens so far, else at the <|vision_start|> sink
# ("the triangle has been shown": its mean over the video is what *when* reads evenly); head 0 at the
# square's and the circle's tokens looks at the other one's earlier tokens, else the sink (the later
# shape then carries the first one's identity, which *order* reads); head 3 at a star's tokens looks at
# the star tokens of the frame pair before, else the sink (sink: this is an onset, which *count* reads); with
# --lead-cells also at the earlier star tokens of its own frame pair (sink: an appearance's lead cell).
LOOKBACK_LAYER = 1
LOOKBACK_HEADS = (2, 0, 3)  # triangle so far, the other of square / circle, star just before


def lookback_targets(labels: torch.Tensor, per_step: int, lead: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, V) bool: which video tokens have a target, per LOOKBACK_HEADS entry; (3, V, V + 1) bool: the
    target positions, column 0 the sink (the token before the video), column 1 + j video token j. `lead`:
    the star head also looks at the earlier star tokens of its own frame pair (labels made with `lead`)."""
    shape, star = labels[:, 0], labels[:, 11] == 1
    n = len(shape)
    step = torch.arange(n) // per_step
    earlier = torch.ones(n, n, dtype=torch.bool).tril()  # j <= i: what token i can see
    tri = shape == CAMERA_SHAPES.index("triangle")
    square, circle = shape == CAMERA_SHAPES.index("square"), shape == CAMERA_SHAPES.index("circle")
    other = torch.where(square.unsqueeze(1), circle.unsqueeze(0), square.unsqueeze(0) & circle.unsqueeze(1))
    just_before = step.unsqueeze(1) - 1 == step.unsqueeze(0)
    if lead:  # and the earlier tokens of its own frame pair
        before = torch.ones(n, n, dtype=torch.bool).tril(-1)  # j < i
        just_before = just_before | ((step.unsqueeze(1) == step.unsqueeze(0)) & before)
    queries = torch.stack([torch.ones(n, dtype=torch.bool), square | circle, star])
    looks = torch.stack([tri.unsqueeze(0) & earlier, other & earlier, just_before & star.unsqueeze(0)])
    looks = looks & queries.unsqueeze(-1)
    sink = queries & ~looks.any(-1)
    return queries, torch.cat([sink.unsqueeze(-1), looks], dim=-1)


class LayerInput:
    """Captures one decoder layer's attention input during a forward."""

    def __init__(self, model, layer: int) -> None:
        self.layer = model.model.language_model.layers[layer].self_attn
        self.captured = None
        self.handle = self.layer.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.captured = (kwargs["hidden_states"], kwargs["position_embeddings"])

    def queries_keys(self, heads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, len(heads), L, D) queries and keys of query heads `heads`, rotary applied as in the model (the
        key of query head h is KV head h // groups: GQA). Removes the hook: one read per forward."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

        self.handle.remove()
        hidden, (cos, sin) = self.captured
        attn = self.layer
        b, n, _ = hidden.shape
        q = attn.q_proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)[:, heads]
        k = attn.k_proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)
        k = k[:, [h // attn.num_key_value_groups for h in heads]]
        return apply_rotary_pos_emb(q, k, cos, sin)

    def attention(self, mask: torch.Tensor, heads, rows: slice, columns: slice) -> torch.Tensor:
        """(B, len(heads), rows, columns) attention of query heads `heads` (same q.k, rotary and mask as the
        model), each row normalised over everything it can see."""
        q, k = self.queries_keys(list(heads))
        seen = slice(0, rows.stop)
        scores = (q[:, :, rows] @ k[:, :, seen].transpose(-1, -2)).float() * self.layer.scaling
        scores = scores.masked_fill(~mask[:, :, rows, seen], float("-inf"))
        return torch.softmax(scores, dim=-1)[..., columns]


def lookback_loss(captured: LayerInput, mask: torch.Tensor, lookback) -> torch.Tensor:
    """Mean over the heads of LOOKBACK_HEADS of -log(attention mass on the targets), over the video tokens
    that have one."""
    start, queries, targets = lookback
    n = queries.shape[-1]
    probs = captured.attention(mask, LOOKBACK_HEADS, slice(start, start + n), slice(start - 1, start + n))
    loss = -((probs * targets).sum(-1).clamp_min(1e-6).log())  # (B, heads, V)
    return torch.stack([loss[:, h][queries[:, h]].mean() for h in range(len(LOOKBACK_HEADS))
                        if queries[:, h].any()]).mean()


class CellProbe(torch.nn.Module):
    """Training-only linear probes on vision tokens: dense supervision that makes features form
    quickly. Shape, colour and digit are read from the vision tower's output; "was the square /
    circle shown earlier" from the decoder's middle layer, where attention to earlier tokens can
    have written it (without it, the order question stayed at chance). Not part of the saved model."""

    def __init__(self, hidden: int, shapes: int = len(SHAPES), middle: tuple[int, ...] = (2, 2),
                 balanced: bool = False) -> None:
        super().__init__()
        self.balanced = balanced  # the shape loss weighs every shape in a batch alike (else rare shapes are ignored)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(hidden, n) for n in (shapes, 1 + len(COLOURS), 10)])
        self.seen = torch.nn.ModuleList([torch.nn.Linear(hidden, n) for n in middle])

    def loss(self, vision: torch.Tensor, middle: torch.Tensor, labels, attention=None) -> torch.Tensor:
        looks = None
        if isinstance(labels, tuple):
            labels, *looks = labels
        heads = [(head, vision, i) for i, head in enumerate(self.heads)]
        heads += [(head, middle, 3 + i) for i, head in enumerate(self.seen)]
        losses = [F.cross_entropy(head(x).float(), labels[:, i], ignore_index=-100,
                                  weight=balanced_weights(labels[:, i], head.out_features)
                                  if i == 0 and self.balanced else None) for head, x, i in heads]
        loss = sum(losses) / len(losses)
        if attention is not None and looks is not None:
            at, head, look, *spread = looks
            loss = loss + attention_target_loss(attention(at, head), look, *spread)
        return loss


def balanced_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Class weights 1 / (tokens of that class in the batch): a weighted mean cross-entropy is then the
    mean over the classes present of each class's mean loss (stars cover about 1% of the camera suite's
    cells: a plain mean lets a head ignore them)."""
    counts = torch.bincount(labels[labels >= 0], minlength=classes).float()
    return torch.where(counts > 0, 1 / counts.clamp_min(1), torch.zeros_like(counts))


class AppearanceProbe(CellProbe):
    """CellProbe plus the `--appearance-targets` columns (see `camera_cell_labels`), summed with
    `weight` rather than averaged in: a star in this frame pair, or with `local` on this token (vision
    output); on the middle layer, a star's onset (on the frame pair's tokens, or with `local` the
    star's own), which of square and circle came first (on their own tokens), and (a soft target)
    whether the triangle's middle has passed. Not part of the saved model."""

    def __init__(self, hidden: int, shapes: int, middle: tuple[int, ...], weight: float = 1.0,
                 local: bool = False, balanced: bool = False) -> None:
        super().__init__(hidden, shapes, middle, balanced)
        self.weight = weight
        self.columns = (11, 12) if local else (7, 8)  # star shown, onset: on the star's tokens or the frame pair's
        self.star, self.onset, self.first = (torch.nn.Linear(hidden, 2) for _ in range(3))
        self.passed = torch.nn.Linear(hidden, 1)

    def loss(self, vision: torch.Tensor, middle: torch.Tensor, labels, attention=None) -> torch.Tensor:
        cells = labels[0] if isinstance(labels, tuple) else labels
        shown, onset = self.columns
        extra = (F.cross_entropy(self.star(vision).float(), cells[:, shown])
                 + F.binary_cross_entropy_with_logits(self.passed(middle).float()[:, 0], cells[:, 10] / 2.0))
        for head, column in ((self.onset, onset), (self.first, 9)):
            if (cells[:, column] >= 0).any():
                extra = extra + F.cross_entropy(head(middle).float(), cells[:, column], ignore_index=-100)
        return super().loss(vision, middle, labels, attention) + self.weight * extra


class ClassProbe(torch.nn.Module):
    """Training-only linear probe for --task examples: the class (shape and colour) of the picture an
    example's answer belongs to, read from the residual stream after the second decoder layer at the
    positions an in-context match needs it (the question's end, the answer). Not part of the model."""

    COPY_LAYER = 2  # the layer whose first head is taught to look up the answer of a same-class example

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(hidden, classes)

    def loss(self, hidden_states, labels, attention=None) -> torch.Tensor:
        classes, where, copy_at, copy = labels
        h = hidden_states[self.COPY_LAYER]
        picked = torch.gather(h, 1, where.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        loss = F.cross_entropy(self.head(picked).float().flatten(0, 1), classes.flatten())
        if attention is not None:
            # attention of head 0 at each target position: its mass on earlier same-class answers
            loss = loss + attention_target_loss(attention(copy_at), copy)
        return loss


class CopyAttention(LayerInput):
    """Captures one layer's attention input during a forward (`ClassProbe.COPY_LAYER` unless told), to
    recompute a head's attention (same q.k, rotary and mask as the model) at chosen query positions."""

    def __init__(self, model, mask: torch.Tensor, layer: int = ClassProbe.COPY_LAYER) -> None:
        super().__init__(model, layer)
        self.mask = mask  # (B, 1, L, L) bool

    def __call__(self, at: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """Attention (B, T, L) of query head `head` (B, T; head 0 when None) at positions `at` (B, T)."""
        head = torch.zeros_like(at) if head is None else head
        q, k = self.queries_keys(list(range(int(head.max()) + 1)))
        rows = torch.arange(at.shape[0]).unsqueeze(-1)
        q = q.transpose(1, 2)[rows, at, head]  # (B, T, D)
        k = k[rows, head]  # (B, T, L, D)
        scores = torch.einsum("btd,btld->btl", q, k) * self.layer.scaling  # (B, T, L)
        allowed = torch.gather(self.mask[:, 0], 1, at.unsqueeze(-1).expand(-1, -1, self.mask.shape[-1]))
        return torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1)


def train_vision(model, adapter, probe: CellProbe, minutes: float, batch: int, rng) -> None:
    """`--vision-minutes` (--task camera): the vision tower and the probe's shape / colour / digit heads
    alone on 32-frame videos (no decoder: several times the frame pairs per CPU second), for `minutes`
    of process CPU time, before the whole model trains."""
    optimizer = torch.optim.AdamW([*model.model.visual.parameters(), *probe.heads.parameters()], lr=1e-3,
                                  weight_decay=0.01)
    started, step = time.process_time(), 0
    while time.process_time() - started < 60 * minutes:
        videos = [synthetic_camera.make_video(TRAIN_SEEDS + int(s), frames=32) for s in rng.integers(0, 2**31, batch)]
        pixels = [adapter.preprocess(v.frames) for v in videos]
        labels = torch.cat([camera_cell_labels(v, p.grid_thw[0], tokens_per_step(p)) for v, p in zip(videos, pixels)])
        out = model.model.visual(torch.cat([p.pixel_values for p in pixels]),
                                 grid_thw=torch.tensor([p.grid_thw for p in pixels])).pooler_output
        loss = sum(F.cross_entropy(head(out).float(), labels[:, i], ignore_index=-100,
                                   weight=balanced_weights(labels[:, i], head.out_features)
                                   if i == 0 and probe.balanced else None)
                   for i, head in enumerate(probe.heads)) / len(probe.heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.model.visual.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            print(f"vision step {step} {(time.process_time() - started) / 60:.1f} CPU min loss {loss.item():.3f}",
                  flush=True)


def grow_vision(model, blocks: int) -> None:
    """Deepen the vision tower by `blocks` blocks that start as the identity: copies of its last block
    whose attention and MLP output projections are zero (each block adds them to the residual)."""
    visual = model.model.visual
    for _ in range(blocks):
        block = copy.deepcopy(visual.blocks[-1])
        for linear in (block.attn.proj, block.mlp.fc2):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
        visual.blocks.append(block)
    model.config.vision_config.depth = len(visual.blocks)


def batched_vision_attention(model) -> None:
    """Training speed-up, same arithmetic: the library's vision attention without flash-attn runs one
    attention call per frame pair (cu_seqlens split); when every frame pair has the same number of
    patches (always, within one video size) this runs them as one batched call instead."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    def attend(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if not bool((lengths == lengths[0]).all()):
            return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, **kwargs)
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        n, size = len(lengths), int(lengths[0])
        q, k, v = (x.reshape(n, size, self.num_heads, -1).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq, -1))

    for block in model.model.visual.blocks:
        block.attn.forward = attend.__get__(block.attn)


def embed_inputs(model, inputs: dict):
    """A Batcher's inputs as the decoder takes them: (embeddings with the vision tower's output at the
    video tokens, input ids, vision output, cell labels, the rest: attention mask and positions)."""
    inputs = dict(inputs)
    labels = inputs.pop("cell_labels", None)
    video = model.model.visual(inputs.pop("pixel_values_videos"), grid_thw=inputs.pop("video_grid_thw")).pooler_output
    ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == model.config.video_token_id).unsqueeze(-1), video.to(embeds.dtype))
    return embeds, ids, video, labels, inputs


def forward(model, inputs, where, probe: CellProbe | None = None):
    """Answer logits (B, branches, vocab) at `where`, and the probe's loss on the vision tokens."""
    inputs = dict(inputs)
    lookback = inputs.pop("lookback", None)
    lookback = lookback if probe is not None else None  # evaluation: no training targets
    embeds, ids, video, labels, inputs = embed_inputs(model, inputs)
    back = LayerInput(model, LOOKBACK_LAYER) if lookback is not None else None
    # the hook is removed when the probe reads it: only hook when a probe will (labels as a tuple carry targets)
    copying = (CopyAttention(model, inputs["attention_mask"], ClassProbe.COPY_LAYER if isinstance(probe, ClassProbe)
                             else LOOK_LAYER) if probe is not None and isinstance(labels, tuple) else None)
    out = model.model.language_model(inputs_embeds=embeds, output_hidden_states=probe is not None, **inputs)
    hidden = out.last_hidden_state
    picked = torch.gather(hidden, 1, where.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    aux = None
    if isinstance(probe, ClassProbe):
        aux = probe.loss(out.hidden_states, labels, copying)
    elif probe is not None:
        middle = out.hidden_states[len(out.hidden_states) // 2][ids == model.config.video_token_id]
        aux = probe.loss(video, middle, labels, copying)
    if back is not None:
        aux = aux + lookback_loss(back, inputs["attention_mask"], lookback)
    return model.lm_head(picked).float(), aux


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, firsts: int, weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy over the answer tokens (targets -100 are padding), the first `firsts` columns (each
    branch's answer word, what evaluation scores) weighted `weight` against the rest (later answer
    tokens, stops); weight 1 is the plain mean."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    weights = torch.ones_like(ce)
    weights[:, :firsts] = weight
    weights = weights * (targets != -100)
    return (ce * weights).sum() / weights.sum()


def branch_logits(model, inputs, where):
    return forward(model, inputs, where)[0]


@torch.no_grad()
def evaluate(model, batcher, frames: int, per_kind: int, batch: int) -> dict[str, float]:
    """Accuracy of the end-of-video questions on held-out seeds (never trained on)."""
    model.eval()
    if isinstance(batcher, ExampleBatcher):
        return evaluate_examples(model, batcher, frames, per_kind, batch)
    kinds = batcher.task.QUESTION_TYPES
    n = len(kinds)
    correct = torch.zeros(n)
    described = 0.0  # videos whose whole probe answer is right, token by token (teacher forced)
    seeds = [1_000_000 + i for i in range(per_kind)]
    for lo in range(0, per_kind, batch):
        inputs, targets, where, _ = batcher(seeds[lo:lo + batch], frames, mid=False)
        logits = branch_logits(model, inputs, where)
        hit = logits.argmax(-1) == targets
        correct += hit[:, :n].sum(0).float()
        if batcher.describe:  # columns: n + 1 heads, n stops, then the rest of the description
            described += float(torch.cat([hit[:, n:n + 1], hit[:, 2 * n + 1:]], dim=1).all(dim=1).sum())
    model.train()
    scores = {kind: float(c) / per_kind for kind, c in zip(kinds, correct)}
    if batcher.describe:
        scores["describe"] = described / per_kind
    return scores


@torch.no_grad()
def evaluate_examples(model, batcher, examples: int, episodes: int, batch: int) -> dict[str, float]:
    """Query accuracy on held-out episodes (8 classes, clips of 1-4 frame pairs) after `examples`
    examples, and after 8 (few: classes seen about once)."""
    model.eval()
    scores = {}
    for name, count in (("query", examples), ("query@8", 8)):
        correct = total = 0
        for lo in range(0, episodes, batch):
            seeds = [1_000_000 + i for i in range(lo, min(episodes, lo + batch))]
            inputs, targets, where, kinds = batcher(seeds, count, query_steps=1 + lo // batch % 4, classes=8)
            hit = branch_logits(model, inputs, where).argmax(-1) == targets
            correct += int(hit[:, :len(kinds)].sum())
            total += hit[:, :len(kinds)].numel()
        scores[name] = correct / total
    model.train()
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", choices=sorted(TASKS), default="synthetic",
                        help="synthetic: stream/suites/synthetic.py (56x56, four questions); "
                        "camera: stream/suites/camera.py")
    parser.add_argument("--minutes", type=float, default=58.0, help="wall-clock budget for training")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256],
                        help="curriculum of video lengths (frames); with --task examples, of the most examples "
                        "per episode (each batch draws its count from 2 up to it)")
    parser.add_argument("--advance-at", type=float, default=0.9,
                        help="mean held-out accuracy that moves the curriculum to the next length")
    parser.add_argument("--stage-minutes", type=float, nargs="+", default=[14, 10, 12],
                        help="longest time spent on each curriculum stage but the last before moving on anyway")
    parser.add_argument("--batch", type=int, default=8, help="videos per step (six questions each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-per-kind", type=int, default=64)
    parser.add_argument("--eval-minutes", type=float,
                        help="also evaluate when this long has passed since the last evaluation (long videos)")
    parser.add_argument("--eval-at-end", action="store_true",
                        help="also evaluate (and maybe keep) the last step (short runs: a run without it keeps "
                        "only what an earlier evaluation saw)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--vision-dim", type=int, default=96)
    parser.add_argument("--probe-weight", type=float, default=1.0,
                        help="weight of the training-only vision probe loss (0 = off)")
    parser.add_argument("--stop-when-perfect", type=int, default=3,
                        help="stop once this many evaluations in a row at the last length score 1.0 on every "
                        "question type (no later checkpoint could be selected over the best)")
    parser.add_argument("--describe", action="store_true",
                        help="also teach an answer to the probe prompt (every slot of the task, in a fixed order)")
    parser.add_argument("--look", action="store_true",
                        help="--task camera: also teach the question's last token where to look (layer 2: head 0 "
                        "on the objects asked about, head 1 on the latest frame pair); training only")
    parser.add_argument("--look-first", action="store_true",
                        help="with --look: the order question looks only at the shape that came first")
    parser.add_argument("--elapsed-probe", action="store_true",
                        help="--task camera: also probe the decoder's middle layer for how long the video has run")
    parser.add_argument("--appearance-targets", nargs="?", const="frame", choices=["frame", "local"],
                        help="with --task camera --look: per-appearance features (star shown, star onset, which "
                        "of square and circle came first, triangle's middle passed) and attention targets that "
                        "read them (count: head 2 over the onsets and a sink; when: head 3 evenly over the video; "
                        "order: head 0 on both shapes); frame (the default): star shown and onset on every token "
                        "of the frame pair; local: on the star's own tokens, and order looks at the shape shown "
                        "first; training only")
    parser.add_argument("--lookback", action="store_true",
                        help="--task camera: also teach layer 1 on the video tokens to look back at "
                        "the triangle so far, at the other of square and circle, at a star's previous frame "
                        "pair (else at a sink), and with --look the order question to read both shapes; training only")
    parser.add_argument("--lead-cells", action="store_true",
                        help="with --appearance-targets local: a star's onset on one lead cell per appearance (the "
                        "first cell it covers solidly) and, with --lookback, the star head also looks at the earlier "
                        "star cells of its own frame pair; measured, not used by the shipped model (its card)")
    parser.add_argument("--grow-vision", type=int, default=0,
                        help="with --init: add this many vision blocks after the checkpoint's, each a copy of its "
                        "last with the residual outputs zeroed (the grown tower starts as the old one)")
    parser.add_argument("--vision-minutes", type=float, default=0.0,
                        help="--task camera: first train the vision tower alone with the probe's shape, colour and "
                        "digit heads for this many CPU minutes (counted in --minutes and --cpu-minutes)")
    parser.add_argument("--balanced-shapes", action="store_true",
                        help="--task camera: the vision probe's shape loss weighs every shape alike (class-balanced)")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the --appearance-targets probes")
    parser.add_argument("--answer-weight", type=float, default=1.0,
                        help="weight of each question's answer word against the other answer tokens (the "
                        "description's words, the stops) in the loss; 1 = the plain mean")
    parser.add_argument("--cpu-minutes", type=float,
                        help="also stop when the process has used this much CPU time (all threads counted)")
    parser.add_argument("--init", type=Path, help="start from this checkpoint instead of random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.task != "camera" and (args.lookback or args.vision_minutes or args.lead_cells):
        parser.error("--lookback, --vision-minutes and --lead-cells are for --task camera")
    if args.lead_cells and not (args.lookback or args.appearance_targets == "local"):
        parser.error("--lead-cells changes the labels of --appearance-targets local and --lookback: give one")

    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    camera = task is synthetic_camera
    examples = task is synthetic_examples
    tokenizer = tiny_tokenizer(WORDS + list(synthetic_camera.WORDS) if camera
                               else WORDS + list(synthetic_examples.WORDS) if examples else WORDS)
    model = build_model(tokenizer, args)
    if args.init:
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.init)
        model.config._attn_implementation = "sdpa"
        if model.get_input_embeddings().num_embeddings < len(tokenizer):  # new words get new rows; old ids stay
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        grow_vision(model, args.grow_vision)
    batcher = ExampleBatcher(model, tokenizer) if examples else Batcher(model, tokenizer, describe=args.describe,
                                                                         task=task, look=args.look,
                                                                         look_first=args.look_first,
                                                                         appearances=args.appearance_targets,
                                                                         lookback=args.lookback,
                                                                         lead_cells=args.lead_cells)
    if not examples:  # the temporal positions it is trained on (not its init's): longer streams are compressed
        # into them; a wider range it reads well is a measurement, declared by hand (see the model cards)
        model.config.emloc_temporal_range = max(args.lengths) // model.config.vision_config.temporal_patch_size
    # what it understands, said wherever the checkpoint is copied (ModelAdapter.model_note: at start, in answers)
    model.config.emloc_model_note = (f"a tiny model trained here on synthetic video only (stream/suites/{args.task}"
                                     ".py); it answers real footage with confident nonsense: for real footage pass "
                                     "--model with a real checkpoint (e.g. Qwen/Qwen2-VL-7B-Instruct)")
    batched_vision_attention(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters; task {args.task}; curriculum {args.lengths} frames", flush=True)
    middle = (2, 2, 5, 16) if args.elapsed_probe else (2, 2, 5)
    hidden = model.config.text_config.hidden_size  # --hidden is ignored with --init: the checkpoint's width
    probe = (ClassProbe(hidden, len(synthetic_examples.all_classes())) if examples
             else AppearanceProbe(hidden, len(CAMERA_SHAPES), middle, args.aux_weight,
                                  local=args.appearance_targets == "local", balanced=args.balanced_shapes)
             if camera and args.appearance_targets
             else CellProbe(hidden, len(CAMERA_SHAPES), middle, balanced=args.balanced_shapes)
             if camera else CellProbe(hidden))
    optimizer = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=args.lr, weight_decay=0.01)
    budget_s = args.minutes * 60
    rng = np.random.default_rng(args.seed)
    stage, step, started = 0, 0, time.time()
    cpu_started, last_eval = time.process_time(), time.time()
    stage_started = started
    perfect = 0
    best, history = None, []
    model.train()
    cpu_budget_s = 60 * args.cpu_minutes if args.cpu_minutes else math.inf
    if args.vision_minutes:  # counted in both budgets: the decoder's schedule starts after it
        train_vision(model, batcher.adapter, probe, args.vision_minutes, args.batch, rng)

    def spent() -> float:  # the share of the budget used: wall clock or CPU, whichever runs out first
        return max((time.time() - started) / budget_s, (time.process_time() - cpu_started) / cpu_budget_s)

    while spent() < 1:
        frames = args.lengths[stage]
        elapsed = spent()
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        seeds = [TRAIN_SEEDS + int(s) for s in rng.integers(0, 2**31, args.batch)]
        count = int(rng.integers(2, frames + 1)) if examples else frames
        inputs, targets, where, kinds = batcher(seeds, count)
        logits, aux = forward(model, inputs, where, probe if args.probe_weight > 0 else None)
        loss = answer_loss(logits, targets, len(kinds), args.answer_weight)
        if aux is not None:
            loss = loss + args.probe_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        due = args.eval_minutes is not None and time.time() - last_eval > 60 * args.eval_minutes
        due = due or (args.eval_at_end and spent() >= 1)  # the last step, too
        if step % 10 == 0 and step % args.eval_every and not due:
            print(f"step {step} {(time.time() - started) / 60:.1f} min frames {frames} loss {loss.item():.3f}",
                  flush=True)
        if step % args.eval_every == 0 or due:
            last_eval = time.time()
            scores = evaluate(model, batcher, frames, args.eval_per_kind, args.batch)
            mean = sum(scores.values()) / len(scores)
            minutes = (time.time() - started) / 60
            history.append(dict(step=step, minutes=round(minutes, 2), frames=frames, loss=round(loss.item(), 4),
                                lr=lr, **scores))
            print(f"step {step} {minutes:.1f} min frames {frames} loss {loss.item():.3f} lr {lr:.2e} "
                  + " ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
            if best is None or (stage, mean) > (best["stage"], best["mean"]):
                best = dict(stage=stage, mean=mean, step=step, frames=frames, scores=scores)
                model.save_pretrained(args.out)
                tokenizer.save_pretrained(args.out)
                batcher.adapter.image_processor.save_pretrained(args.out)
            perfect = perfect + 1 if stage + 1 == len(args.lengths) and min(scores.values()) == 1.0 else 0
            if args.stop_when_perfect and perfect >= args.stop_when_perfect:
                print(f"held-out accuracy perfect {perfect} times in a row at {frames} frames: stopping", flush=True)
                break
            overdue = stage < len(args.stage_minutes) and time.time() - stage_started > 60 * args.stage_minutes[stage]
            if (mean >= args.advance_at or overdue) and stage + 1 < len(args.lengths):
                stage, stage_started = stage + 1, time.time()
                print(f"curriculum: moving to {args.lengths[stage]} frames", flush=True)
    total = (time.time() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)  # a run that never evaluated has saved nothing yet
    (args.out / "training.json").write_text(json.dumps(
        dict(args={k: str(v) for k, v in vars(args).items()}, parameters=params, steps=step,
             minutes=round(total, 1), cpu_minutes=round((time.process_time() - cpu_started) / 60, 1), best=best,
             history=history), indent=2) + "\n")
    print(f"done: {step} steps in {total:.1f} min ({(time.process_time() - cpu_started) / 60:.1f} CPU min); "
          f"best {best}", flush=True)


if __name__ == "__main__":
    main()
