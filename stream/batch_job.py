"""One recorded video of a batch: its questions in, its answers out, as plain data.

Whoever runs a batch (the local loop, a Ray worker) calls `answer_one_video` for each
video; the answers it returns are what the batch writes. A question with `at` is answered
when the video reaches that second; a question without it is answered at the end of the
video, over the whole video, and guides the pruning all along (query-aware), since a
batch knows its questions before it reads a frame.
"""

from __future__ import annotations

from pathlib import Path

from emloc import EMLoCSettings, ModelAdapter, StreamContext
from emloc.settings import MAX_NEW_TOKENS
from sinks import AnswerEvent, Sink

from .questions import Question, QuestionQueue
from .runtime import StreamRunner
from .sources import open_source


class _Collect(Sink):
    def __init__(self) -> None:
        self.events: list[AnswerEvent] = []

    def deliver(self, event: AnswerEvent) -> None:
        self.events.append(event)


def answer_one_video(adapter: ModelAdapter, settings: EMLoCSettings, path: str | Path, questions: list[Question], *,
                     fps: float, max_new_tokens: int = MAX_NEW_TOKENS, stream_id: str | None = None,
                     task=None) -> list[dict]:
    """The answers (AnswerEvent dicts) to `questions` about the video at `path`; raises VideoError
    if the video cannot be read. Nothing is written: the caller delivers the answers. task: the
    TaskPack the video's stream starts from (shared, read-only), or None."""
    stream_id = stream_id if stream_id is not None else str(path)
    context = StreamContext(adapter, settings=settings, task=task)
    scheduled = [q for q in questions if q.at is not None]
    queue = QuestionQueue(max_waiting=max(len(scheduled), 1))
    for question in scheduled:
        queue.submit(question)
    collect = _Collect()
    # no "at": answered by `finish` over the whole video, an observer until then (as the local batch does)
    runner = StreamRunner(stream_id, context, queue, [collect], max_new_tokens=max_new_tokens,
                          at_end=[q for q in questions if q.at is None])
    for frame in open_source(path).frames(fps=fps):
        runner.feed(frame)
    runner.finish()
    return [event.to_dict() for event in collect.events]
