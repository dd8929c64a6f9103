"""One recorded video, start to end: decode, sample, chunk, fold, answer.

Every path that answers a recorded video goes through here: `demo`, `run`, `batch` (its local loop and its
Ray workers alike), the OpenAI endpoint's `video_url`, the lmms-eval model and the benchmarks. So what the
benchmarks measure is what users run, and the paths cannot drift apart again (they had: `batch --ray`
pruned by the questions under `--no-query-aware`, and matched a question's "video" by fewer names).

Held here, once:
- the query-aware choice: the questions, known before the video, guide what the cache keeps (the paper's
  offline setting), or the probe prompt does, as in a live stream where the question comes later;
- when a question is answered: one with "at" when the video reaches that second (over the cache and the
  frames not yet in a chunk; at the end if the video is shorter), the others at the end, over the whole video;
- which questions a video of a batch gets (`video_names`: a question's "video" is its file name, its path,
  or its path relative to the batch's folder) and which of them are still to answer (`batch_jobs`: the
  answered pairs of an interrupted batch are skipped);
- a video's stream starting from a task pack (`VideoJob.answer`);
- the progress lines of `demo` and `run` (`progress`) and of `batch` (`batch_progress`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from emloc import Answer, EMLoCSettings, FoldRecord, InputError, ModelAdapter, StreamContext
from emloc.settings import MAX_NEW_TOKENS
from sinks import AnswerEvent, Sink

from .questions import BadQuestion, Question, QuestionQueue
from .runtime import StreamRunner
from .sources import Frame, open_source

log = logging.getLogger("emloc_stream")


def as_questions(questions: Sequence[Question | str]) -> list[Question]:
    """Questions as the schema has them; a plain text is question `q<i>` (its place in the list), asked at the end."""
    out = []
    for i, question in enumerate(questions):
        if isinstance(question, Question):
            out.append(question)
            continue
        try:
            out.append(Question(f"q{i}", question, origin="cli"))
        except BadQuestion as error:
            raise InputError(f"question {i + 1} ({str(question)[:60]!r}): {error}") from error
    return out


def answer_video(context: StreamContext, frames: Iterable[Frame], questions: Sequence[Question | str], *,
                 query_aware: bool, max_new_tokens: int = MAX_NEW_TOKENS, stream_id: str = "video",
                 sinks: Sequence[Sink] = (),
                 on_fold: Callable[[FoldRecord], None] | None = None,
                 on_error: Callable[[str, str], None] | None = None) -> list[Answer | None]:
    """Folds every frame into `context` and answers each question at its time; returns the answers in the
    order of `questions` (None for one that failed and was reported to `on_error`). Each answer is also
    delivered to `sinks` as it comes, as the stream `stream_id`.

    query_aware: the questions guide the pruning (all of them, from the first chunk); otherwise the
        probe prompt does.
    on_error(question id, message): a question that could not be answered (one the tokenizer cannot take,
        a video without frames); the others are still answered. Without it, the first such raises InputError.
    """
    asked = as_questions(questions)
    scheduled = [q for q in asked if q.at is not None]
    queue = QuestionQueue(max_waiting=max(len(scheduled), 1))
    for question in scheduled:
        queue.submit(question)
    answers: dict[str, Answer] = {}

    def refuse(question_id: str, message: str) -> None:
        raise InputError(f"question {question_id}: {message}")

    runner = StreamRunner(stream_id, context, queue, sinks, max_new_tokens=max_new_tokens,
                          at_end=[q for q in asked if q.at is None], observe_questions=query_aware,
                          on_fold=None if on_fold is None else lambda runner: on_fold(context.records[-1]),
                          on_answer=lambda question, answer: answers.__setitem__(question.id, answer),
                          on_error=on_error or refuse)
    for frame in frames:
        runner.feed(frame)
    runner.finish()
    return [answers.get(q.id) for q in asked]


def video_names(path: Path, root: Path) -> set[str]:
    """What a question's "video" may say to mean this video of a batch: its file name, its path as the batch
    lists it, or its path relative to the batch's folder."""
    names = {path.name, str(path)}
    try:
        names.add(str(path.relative_to(root)))
    except ValueError:
        pass
    return names


class CountedFrames:
    """Frames passed through as they are read, counted (`count`): how many a job sampled."""

    def __init__(self, frames: Iterable[Frame]) -> None:
        self.frames, self.count = frames, 0

    def __iter__(self) -> Iterator[Frame]:
        for frame in self.frames:
            self.count += 1
            yield frame


class _Collect(Sink):
    def __init__(self) -> None:
        self.events: list[AnswerEvent] = []

    def deliver(self, event: AnswerEvent) -> None:
        self.events.append(event)


@dataclass(frozen=True)
class Answered:
    """What a job did: its answers (in the order given), the frames it sampled and the chunks it folded."""

    events: list[AnswerEvent]
    frames: int
    chunks: int


@dataclass(frozen=True)
class VideoJob:
    """One video of a batch and its questions still to answer; plain data, so a Ray worker can be handed it."""

    path: Path
    stream_id: str
    questions: list[Question]

    def answer(self, adapter: ModelAdapter, settings: EMLoCSettings, *, fps: float, query_aware: bool,
               max_new_tokens: int = MAX_NEW_TOKENS, task=None, sinks: Sequence[Sink] = (),
               progress: Callable[[float | None], Callable[[FoldRecord], None]] | None = None) -> Answered:
        """Its answers, also delivered to `sinks` as they come; raises VideoError if the video cannot be read.
        task: the TaskPack the video's stream starts from (shared, read-only), or None. progress: given the
        video's duration (None if unknown), what to call after each fold. A question that cannot be answered
        is logged; the others are answered."""
        source = open_source(self.path)
        on_fold = progress(source.duration()) if progress is not None else None
        context = StreamContext(adapter, settings=settings, task=task)
        collect, frames = _Collect(), CountedFrames(source.frames(fps=fps))
        answer_video(context, frames, self.questions, query_aware=query_aware, max_new_tokens=max_new_tokens,
                     stream_id=self.stream_id, sinks=[*sinks, collect], on_fold=on_fold,
                     on_error=lambda qid, message: log.error("%s: question %s: %s", self.stream_id, qid, message))
        return Answered(collect.events, frames.count, context.chunks_folded)


def batch_jobs(videos: list[Path], root: Path, questions: list[Question],
               done: set[tuple[str, str]]) -> list[tuple[VideoJob, str | None]]:
    """Each video of a batch as a job: the questions naming it or no video, less those already answered (`done`:
    (stream id, question id) pairs); with why it is skipped ("no question names this video", "already
    answered"), else None. A video's stream id is its path as the batch lists it."""
    jobs = []
    for path in videos:
        names = video_names(path, root)
        mine = [q for q in questions if q.meta.get("video") is None or q.meta["video"] in names]
        todo = [q for q in mine if (str(path), q.id) not in done]
        skipped = "no question names this video" if not mine else "already answered" if not todo else None
        jobs.append((VideoJob(path, str(path), todo), skipped))
    return jobs


def unmatched(videos: list[Path], root: Path, questions: list[Question]) -> list[Question]:
    """The questions that name a video not in the batch."""
    known = set().union(*(video_names(path, root) for path in videos))
    return [q for q in questions if q.meta.get("video") is not None and q.meta["video"] not in known]


def progress(total: int | None, duration: float | None = None) -> Callable[[FoldRecord], None]:
    """`demo`'s and `run`'s line a folded chunk: frames so far (of `total`), how far through the video, and the
    fold's summary."""
    seen = [0]

    def show(record: FoldRecord) -> None:
        seen[0] += record.frames
        of = f"/{total}" if total else ""
        done = ""
        if duration and record.time_span:
            done = f" {min(100.0, 100 * record.time_span[1] / duration):5.1f}%"
        print(f"[{seen[0]:>5}{of} frames{done}] {record.summary()}", flush=True)
    return show


def batch_progress(tag: str, fps: float) -> Callable[[float | None], Callable[[FoldRecord], None]]:
    """`batch`'s line a folded chunk: frames so far, how far through the video (a frame covers 1/fps s),
    chunks folded and tokens per layer."""
    def for_video(duration: float | None) -> Callable[[FoldRecord], None]:
        frames = [0]

        def show(record: FoldRecord) -> None:
            frames[0] += record.frames
            done = (f", {min(100.0, 100 * (record.time_span[1] + 1 / fps) / duration):.0f}%"
                    if duration and record.time_span else "")
            tokens = round(sum(record.tokens_after) / len(record.tokens_after))
            print(f"{tag}: {frames[0]} frames{done}, {record.index + 1} chunks folded, {tokens} tokens/layer",
                  flush=True)
        return show
    return for_video
