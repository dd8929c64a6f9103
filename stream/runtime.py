"""One stream at run time: frames in, chunks folded, due questions answered, answers delivered.

The runner is driven by whoever owns the frames (a file loop, a live reader thread's
consumer): `feed` each sampled frame, `poll` between frames so that one-off questions are
answered promptly (over the cache plus the frames not yet in a full chunk), and `finish`
at the end of a finite source, which folds the last short chunk and answers every
question still waiting, then the `at_end` ones (a recorded video's questions without "at":
known from the start, so they guide pruning, but answered over the whole video). A failing
sink is reported and the others still get the answer.

Folding has a guaranteed share: questions are taken from the queue one at a time, and while
frames wait to be folded (`behind()`, e.g. a live source's buffer holds frames) at most
`answers_per_fold` one-off or scheduled questions are answered between two folds; the others
stay in the queue (cancellable) until the next fold. So however many questions wait, each
chunk costs at most its fold plus `answers_per_fold` answers, and a live stream's lag stays
bounded. Standing questions are answered after their fold as before (at most `max_standing`),
and so are scheduled questions whose time the frame just fed reached (they are answered over
the video up to that time, or not at all; how many may wait is `max_scheduled`'s to bound); one
asked with a time already past is due at once and waits its turn like a one-off.
Caught up (nothing behind), questions are answered as they come, the source checked between two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from emloc import Answer, InputError, StreamContext
from emloc.settings import MAX_NEW_TOKENS
from sinks import AnswerEvent, Sink

from .chunker import Chunker
from .questions import Question, QuestionQueue
from .sources import Frame

log = logging.getLogger("emloc_stream")


@dataclass
class StreamStatus:
    stream_id: str
    state: str = "starting"  # starting, running, reconnecting, ended, failed
    frames_seen: int = 0  # frames the sampler kept
    frames_dropped: int = 0  # frames dropped because folding fell behind a live source
    chunks_folded: int = 0
    cache_tokens: int = 0
    temporal_scale: float = 1.0  # < 1 once the video's temporal positions were compressed (temporal_range)
    stream_time: float | None = None  # timestamp of the newest frame fed
    lag_s: float = 0.0  # how far the newest folded frame is behind the source's newest frame
    answers: int = 0
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class StreamRunner:
    def __init__(self, stream_id: str, context: StreamContext, queue: QuestionQueue, sinks: Sequence[Sink], *,
                 max_new_tokens: int = MAX_NEW_TOKENS, on_error: Callable[[str, str], None] | None = None,
                 on_fold: Callable[[StreamRunner], None] | None = None,
                 source_state: Callable[[], str] | None = None, at_end: Sequence[Question] = (),
                 observe_questions: bool = True, behind: Callable[[], bool] | None = None,
                 answers_per_fold: int = 2, on_answer: Callable[[Question, Answer], None] | None = None) -> None:
        """source_state: the source's state, named when a question comes before any video.
        at_end: questions answered by `finish` (over the whole of a finite source), observers until then.
        observe_questions: False folds with the probe observer only (query-agnostic), whatever waits.
        behind: whether frames wait to be fed (a live source's buffer); then at most `answers_per_fold`
        one-off or scheduled answers between two folds. Without it nothing is ever behind.
        on_answer: called with each question and the model's answer (its tokens too), before the sinks."""
        if not isinstance(answers_per_fold, int) or answers_per_fold < 1:
            raise ValueError(f"answers_per_fold must be an integer >= 1, got {answers_per_fold!r}")
        self.stream_id, self.context, self.queue, self.sinks = stream_id, context, queue, list(sinks)
        self.behind = behind or (lambda: False)
        self.answers_per_fold = answers_per_fold
        self.answers_since_fold = 0  # one-off and scheduled answers since the last fold
        self.previous_time: float | None = None  # timestamp of the frame fed before the newest
        self.at_end = list(at_end)
        self.observe_questions = observe_questions
        self.max_new_tokens = max_new_tokens
        self.chunker = Chunker(context.settings.chunk_frames)
        self.status = StreamStatus(stream_id)
        self.last_folded_time: float | None = None
        self.on_fold = on_fold
        self.on_answer = on_answer
        self.source_state = source_state or (lambda: self.status.state)  # named when a question finds no video
        self.on_error = on_error or (lambda qid, message: log.error("%s: question %s: %s", stream_id, qid, message))

    def feed(self, frame: Frame) -> None:
        self.status.frames_seen += 1
        self.previous_time, self.status.stream_time = self.status.stream_time, frame.time
        self.status.state = "running"
        chunk = self.chunker.push(frame)
        if chunk is not None:
            self._fold(chunk.frames, chunk.times)
            self._answer(self.queue.take_due(frame.time, self.context.chunks_folded, chunk_just_folded=True,
                                             limit=1))
        self.poll()

    def has_video(self) -> bool:
        """Whether a question has anything to be answered over: a folded chunk or frames waiting for one."""
        return self.context.chunks_folded > 0 or self.chunker.pending() is not None

    def poll(self) -> None:
        """Answers the questions due now (one-off, or scheduled at a time the stream has reached), one at a
        time, until folding's share stops it (see the module's docstring). Before the first frame, a question
        that asked to wait stays; the others get an error."""
        while True:
            if self.answers_since_fold >= self.answers_per_fold and self.behind():  # folding's turn
                if self.status.stream_time is not None:  # but a scheduled question is answered at its time
                    self._answer(self.queue.take_on_time(self.previous_time, self.status.stream_time))
                return
            due = self.queue.take_due(self.status.stream_time, self.context.chunks_folded, chunk_just_folded=False,
                                      video=self.has_video(), limit=1)
            if not due:
                return
            self._answer(due)

    def finish(self) -> None:
        """End of a finite source: fold what is left, answer everything still waiting."""
        last = self.chunker.flush()
        if last is not None:
            self._fold(last.frames, last.times)
        at_end, self.at_end = self.at_end, []
        self._answer(self.queue.take_due(self.status.stream_time, self.context.chunks_folded,
                                         chunk_just_folded=last is not None) + self.queue.take_all() + at_end)
        self.status.state = "ended"

    def observers(self) -> list[str]:
        if not self.observe_questions:
            return []
        return list(dict.fromkeys(self.queue.observers() + [q.text for q in self.at_end]))

    def status_from_context(self) -> None:
        """The status's view of the cache: chunks folded, tokens per layer, temporal spacing."""
        self.status.chunks_folded = self.context.chunks_folded
        self.status.cache_tokens = round(sum(self.context.cache.lengths()) / self.context.adapter.num_layers)
        self.status.temporal_scale = self.context.temporal.scale

    def _fold(self, frames, times) -> None:
        self.context.fold(frames, questions=self.observers(), timestamps=times)
        self.status_from_context()
        self.last_folded_time = times[-1]
        self.answers_since_fold = 0
        if self.on_fold is not None:
            self.on_fold(self)

    def _answer(self, questions: list[Question]) -> None:
        pending = self.chunker.pending()
        if questions and not self.has_video():  # never an answer over an empty cache
            for question in questions:
                self.on_error(question.id, f"stream {self.stream_id} has no video yet (state: {self.source_state()})"
                              + ("; ask with \"wait\": true to be answered once it has" if not question.wait else ""))
            return
        for question in questions:
            try:
                answer = self.context.answer(question.text, max_new_tokens=self.max_new_tokens,
                                             partial_frames=pending.frames if pending else None)
            except InputError as error:  # e.g. a question the tokenizer cannot take: that question fails alone
                self.on_error(question.id, str(error))
                continue
            span = answer.time_span
            if pending is not None:
                span = (span[0] if span else pending.times[0], pending.times[-1])
            event = AnswerEvent(self.stream_id, question.id, question.text, answer.text, span, time.time(),
                                answer.cache_tokens, answer.latency_s, expected=question.meta.get("expected"),
                                model_note=self.context.adapter.model_note)
            self.status.answers += 1
            self.answers_since_fold += question.every is None
            if self.on_answer is not None:
                self.on_answer(question, answer)
            self.deliver(event)

    def deliver(self, event: AnswerEvent) -> None:
        for sink in self.sinks:
            try:
                sink.deliver(event)
            except Exception as error:  # one broken sink must not starve the others
                log.error("%s: sink %s failed to deliver %s: %s", self.stream_id, type(sink).__name__,
                          event.question_id, error)
