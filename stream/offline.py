"""One recorded video, start to end: decode, sample, chunk, fold, answer.

The CLI's `demo` and `run` and the fidelity benchmark all go through `answer_video`,
so what the benchmark measures is what users run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from emloc import Answer, FoldRecord, StreamContext
from emloc.settings import MAX_NEW_TOKENS

from .chunker import chunks
from .sources import Frame


def answer_video(context: StreamContext, frames: Iterable[Frame], questions: list[str], *,
                 query_aware: bool = False, max_new_tokens: int = MAX_NEW_TOKENS,
                 on_fold: Callable[[FoldRecord], None] | None = None) -> list[Answer]:
    """Folds every frame into `context`, then answers each question over the compressed cache.

    query_aware: the questions are known before the video, so they are the observers
        that guide pruning (as in the paper); otherwise the probe prompt is, as in a live
        stream where the question comes later.
    """
    observers = list(questions) if query_aware else []
    for chunk in chunks(frames, context.settings.chunk_frames):
        record = context.fold(chunk.frames, questions=observers, timestamps=chunk.times)
        del chunk  # not held while the next one is decoded
        if on_fold is not None:
            on_fold(record)
    return [context.answer(q, max_new_tokens=max_new_tokens) for q in questions]
