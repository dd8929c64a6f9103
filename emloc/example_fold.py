"""Labelled examples folded into a stream before its video: what a task pack is made of.

Each example is a picture or clip, its question and its answer, then the next user turn
(`adapter.example_ids`); a chunk of examples is folded like a chunk of video. Its observers are
held-out examples (picture, question and answer, run after the chunk) whose answer tokens and the
stop after them the bound keeps: EMLoC's many-shot setting. Examples become sinks: never evicted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .fold import fold_segment
from .observer import Observer, ObserverRun

if TYPE_CHECKING:
    from .context import StreamContext


def fold_examples(context: StreamContext, examples, observers=()) -> dict:
    """Folds `examples` (objects with `frames` (T, H, W, 3) uint8, `question` and `answer`) with
    held-out `observers` of the same kind; returns the fields of the chunk's `FoldRecord`."""
    if context.temporal.steps:
        raise InputError("examples go before the video: this stream has already folded frames")
    adapter = context.adapter
    clock = time.perf_counter()
    pieces, positions, steps = [], [], []
    start = context.video_start
    for k, example in enumerate(examples):
        video, video_positions = _example_video(context, example.frames, start)
        tail = adapter.example_ids(example.question, example.answer)
        first = int(video_positions.max()) + 1
        pieces += [video, adapter.embed_text(tail)]
        positions += [video_positions, adapter.text_positions(first, len(tail))]
        steps.append(torch.full((video.shape[1] + len(tail),), k))
        start = first + len(tail)
    if not pieces:
        raise InputError("a chunk of examples needs at least one example")
    embeds, positions = torch.cat(pieces, dim=1), torch.cat(positions, dim=1)
    prepared = [_example_observer(context, o) for o in observers]
    vision_s = time.perf_counter() - clock
    fold = fold_segment(context, embeds, positions, torch.cat(steps),
                        lambda at: [_example_run(context, o, at) for o in prepared])
    fold.pop("probe_answer")
    context.video_start = start  # the next picture (or the stream's video) starts here
    context.max_position = max(context.max_position, start - 1)
    context.sink_tokens = context.tokens_seen  # examples are never evicted
    return dict(fold, frames=sum(len(e.frames) for e in examples), padded_frames=0, vision_s=vision_s,
                positions=(int(positions[0].min()), int(positions[0].max())))


def _example_video(context: StreamContext, frames, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = context.adapter.preprocess(frames)
    return context.adapter.encode_video(pixels), context.adapter.video_positions(start, 0, pixels)


def _example_observer(context: StreamContext, example) -> tuple[Observer, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(observer, picture embeddings, picture positions from 0, question + answer ids)."""
    video, positions = _example_video(context, example.frames, 0)
    answer = context.adapter.answer_ids(example.answer)
    ids = torch.cat([context.adapter.question_ids(example.question), answer])
    return Observer("example", example.question, tuple(answer.tolist())), video, positions, ids


def _example_run(context: StreamContext, prepared, start: int) -> ObserverRun:
    observer, video, video_positions, ids = prepared
    video_positions = video_positions + start
    first = int(video_positions.max()) + 1
    embeds = torch.cat([video, context.adapter.embed_text(ids)], dim=1)
    positions = torch.cat([video_positions, context.adapter.text_positions(first, len(ids))], dim=1)
    return ObserverRun(observer, embeds, positions, len(observer.answer_ids) + 1)
