"""The question queue: one-off, scheduled and standing questions, bounded, nothing dropped silently.

A question is
- one-off: answered at the next opportunity (now, over the cache and any partial chunk);
- scheduled (`at` seconds of stream time): answered once the stream reaches `at`, as in
  VideoMME's online setting;
- standing (`every` K chunks): re-answered after every K-th folded chunk for as long as the stream runs.

Waiting and standing questions are also the observers that guide pruning.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

MAX_QUESTION_CHARS = 2000


class QueueFull(RuntimeError):
    """The queue holds its maximum of waiting questions; the producer must retry later."""


class BadQuestion(ValueError):
    """A question that cannot be accepted; the message says why."""


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    at: float | None = None  # stream time (s) to answer at
    every: int | None = None  # standing: re-answer every K folded chunks
    origin: str = "cli"  # where it came from (cli, file, stdin, mqtt)
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise BadQuestion("question text must be a non-empty string")
        if len(self.text) > MAX_QUESTION_CHARS:
            raise BadQuestion(f"question text is {len(self.text)} characters; the limit is {MAX_QUESTION_CHARS}")
        if self.at is not None and (not isinstance(self.at, (int, float)) or isinstance(self.at, bool)
                                    or self.at < 0):
            raise BadQuestion(f"'at' must be a number of seconds >= 0, got {self.at!r}")
        if self.every is not None and (not isinstance(self.every, int) or isinstance(self.every, bool)
                                       or self.every < 1):
            raise BadQuestion(f"'every' must be an integer number of chunks >= 1, got {self.every!r}")
        if self.at is not None and self.every is not None:
            raise BadQuestion("a question is either scheduled ('at') or standing ('every'), not both")


class QuestionQueue:
    """Thread-safe: producers (CLI, MQTT) submit from any thread; the stream loop takes."""

    def __init__(self, max_waiting: int = 64) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.max_waiting = max_waiting
        self._waiting: list[Question] = []
        self._standing: list[Question] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def new_id(self) -> str:
        """An id no question in the queue has (restored questions keep theirs)."""
        with self._lock:
            taken = {q.id for q in self._waiting + self._standing}
        while (candidate := f"q{next(self._ids)}") in taken:
            pass
        return candidate

    def submit(self, question: Question) -> Question:
        """Accepts a question or raises `QueueFull`; an accepted question will be answered."""
        with self._lock:
            if question.every is not None:
                self._standing.append(question)
                return question
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} questions are waiting (the limit is {self.max_waiting}); "
                                f"question {question.id!r} was not accepted, retry later")
            self._waiting.append(question)
            return question

    def observers(self) -> list[str]:
        """Texts of the waiting and standing questions, waiting first."""
        with self._lock:
            return list(dict.fromkeys(q.text for q in self._waiting + self._standing))

    def take_due(self, stream_time: float | None, chunks_folded: int, chunk_just_folded: bool) -> list[Question]:
        """Removes and returns waiting questions due now; adds standing ones due after this chunk."""
        with self._lock:
            due, still = [], []
            for q in self._waiting:
                ready = q.at is None or (stream_time is not None and stream_time >= q.at)
                (due if ready else still).append(q)
            self._waiting = still
            if chunk_just_folded:
                due += [q for q in self._standing if chunks_folded % q.every == 0]
            return due

    def take_all(self) -> list[Question]:
        """Every waiting question, due or not: the end of a finite stream answers them all."""
        with self._lock:
            out, self._waiting = self._waiting, []
            return out

    def snapshot(self) -> list[dict]:
        """Waiting and standing questions as plain data (for saved state)."""
        with self._lock:
            return [dict(id=q.id, text=q.text, at=q.at, every=q.every, origin=q.origin, meta=q.meta)
                    for q in self._waiting + self._standing]

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def withdraw_standing(self, question_id: str) -> bool:
        """Stops re-answering the standing question `question_id`; False if there is none by that id."""
        with self._lock:
            kept = [q for q in self._standing if q.id != question_id]
            found, self._standing = len(kept) != len(self._standing), kept
            return found
