"""The question queue: one-off, scheduled and standing questions, bounded, nothing dropped silently.

A question is
- one-off: answered at the next opportunity (now, over the cache and any partial chunk);
- scheduled (`at` seconds of stream time): answered once the stream reaches `at`, as in
  VideoMME's online setting;
- standing (`every` K chunks): re-answered after every K-th folded chunk for as long as the stream runs.

Each kind has its own limit, so a flood of one kind cannot starve another: far-future
scheduled questions never take a one-off's place. `at` must lie within `horizon` seconds
of the stream's time. Ids are unique for the queue's life (a redelivered question is
recognised by its id), and any waiting or standing question can be cancelled by id.
Waiting and standing questions are also the observers that guide pruning.

One schema for every transport: a question from outside is a JSON object of the fields
`id`, `question`, `at`, `every`, `wait` (`QUESTION_FIELDS`), read by `Question.from_dict`
whether it came over MQTT, the REST API, the OpenAI chat endpoint (its last user message's
text), a questions file (which may add `video` and `expected`) or a saved state (which adds
`origin` and `meta`), so each field, limit and error message is the same everywhere.

Control tokens: `question_text` is the one rule every transport's text passes. Text is
text: the chat template's control tokens written in it (`<|im_end|>`, ...) are accepted and
read as the plain characters they are written with (the model adapter tokenizes questions
with `split_special_tokens`), so a question cannot open or close a turn, and no transport
refuses or rewrites them.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_QUESTION_CHARS = 2000
MAX_ID_CHARS = 128
MAX_EVERY = 1_000_000  # chunks between a standing question's answers
MAX_AT = 1e15  # seconds of stream time: a bound on the number itself; the queue's horizon is the practical one
REMEMBERED_IDS = 100_000  # ids of answered questions kept to recognise a redelivery
MAX_SAFE_INT = 2**53  # integer ids beyond this are refused (they would not survive a JSON client)
QUESTION_FIELDS = ("id", "question", "at", "every", "wait")  # what a client may send, on any transport
EXTRA_FIELDS = {  # what a reader adds to the schema, by where the dict was read
    "file": ("video", "expected"),  # a questions file: which recorded video, the answer a benchmark expects
    "state": ("origin", "meta"),  # a saved state: where the question first came from, its transport's notes
}


class QueueFull(RuntimeError):
    """The queue holds its maximum of questions of this kind; the producer must retry later."""


class BadQuestion(ValueError):
    """A question that cannot be accepted; the message says why."""


class DuplicateId(BadQuestion):
    """A question whose id the queue has already accepted; `same` if its text is the same too
    (a redelivery of the same question, e.g. by MQTT QoS 1, which must not be answered twice)."""

    def __init__(self, message: str, same: bool) -> None:
        super().__init__(message)
        self.same = same


def check_id(qid) -> str:
    """A question id: a non-empty string of at most MAX_ID_CHARS printable characters, or an integer
    a JSON client holds exactly (within +-2**53), which is read as its decimal string."""
    if isinstance(qid, int) and not isinstance(qid, bool):
        if abs(qid) > MAX_SAFE_INT:
            raise BadQuestion("an integer 'id' must lie within +-2**53; use a string id")
        return str(qid)
    if not isinstance(qid, str):
        raise BadQuestion(f"'id' must be a string or an integer, got {type(qid).__name__}")
    if not qid or len(qid) > MAX_ID_CHARS:
        raise BadQuestion(f"'id' must be 1 to {MAX_ID_CHARS} characters, got {len(qid)}")
    if not qid.isprintable():
        raise BadQuestion("'id' must be printable text (no control characters)")
    return qid


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    at: float | None = None  # stream time (s) to answer at
    every: int | None = None  # standing: re-answer every K folded chunks
    origin: str = "cli"  # where it came from (cli, file, stdin, mqtt)
    meta: dict = field(default_factory=dict, compare=False)
    wait: bool = False  # asked before the stream has video: wait for its first frames instead of an error

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise BadQuestion(f"'id' must be a string, got {type(self.id).__name__}")
        check_id(self.id)
        question_text(self.text)
        if self.at is not None and (not isinstance(self.at, (int, float)) or isinstance(self.at, bool)
                                    or not (isinstance(self.at, int) or math.isfinite(self.at))
                                    or not 0 <= self.at <= MAX_AT):
            raise BadQuestion(f"'at' must be a finite number of seconds from 0 to {MAX_AT:g}, got {_short(self.at)}")
        if self.every is not None and (not isinstance(self.every, int) or isinstance(self.every, bool)
                                       or not 1 <= self.every <= MAX_EVERY):
            raise BadQuestion(f"'every' must be an integer number of chunks from 1 to {MAX_EVERY}, "
                              f"got {_short(self.every)}")
        if self.at is not None and self.every is not None:
            raise BadQuestion("a question is either scheduled ('at') or standing ('every'), not both")
        if not isinstance(self.wait, bool):
            raise BadQuestion(f"'wait' must be true or false, got {self.wait!r}")

    @property
    def kind(self) -> str:
        return "standing" if self.every is not None else "scheduled" if self.at is not None else "one-off"

    @classmethod
    def from_dict(cls, data, origin: str, *, new_id: Callable[[], str] | None = None) -> Question:
        """The question in `data`, a dict from outside (parsed JSON), or BadQuestion saying what is wrong.

        origin: where it was read: "mqtt", "http", "file" (a questions file: `video` and `expected`
        go to `meta`), or "state" (a saved state: its own `origin` and `meta` are kept, and the field
        `text` of states saved before the schema is read as `question`). new_id: the id of a question
        sent without one (the queue's next id, or a file's line number); None: `id` is required."""
        if not isinstance(data, dict):
            raise BadQuestion(f"a question must be a JSON object, got {type(data).__name__}")
        if origin == "state" and "text" in data and "question" not in data:
            data = {("question" if k == "text" else k): v for k, v in data.items()}  # saved before the schema
        known = QUESTION_FIELDS + EXTRA_FIELDS.get(origin, ())
        unknown = sorted(str(k)[:40] for k in set(data) - set(known))
        if unknown:
            raise BadQuestion(f"unknown field(s) {unknown}; known fields are {list(known)}")
        if "question" not in data:
            raise BadQuestion("missing field 'question'")
        if not isinstance(data["question"], str):
            raise BadQuestion(f"'question' must be a string, got {type(data['question']).__name__}")
        if "id" in data:
            qid = check_id(data["id"])
        elif new_id is not None:
            qid = new_id()
        else:
            raise BadQuestion("missing field 'id'")
        for name in ("at", "every"):
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise BadQuestion(f"'{name}' must be a number, got {type(value).__name__}")
        meta = {}
        if origin == "file":
            if "video" in data and (not isinstance(data["video"], str) or not data["video"]):
                raise BadQuestion("'video' must be a file name or path")
            meta = {k: data[k] for k in ("video", "expected") if k in data}
        elif origin == "state":
            meta = data.get("meta", {})
            if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
                raise BadQuestion(f"'meta' must be an object, got {str(meta)[:40]}")
            origin = data.get("origin", "state")
            if not isinstance(origin, str) or not origin.isidentifier() or len(origin) > 32:
                raise BadQuestion(f"'origin' must be a transport's name, got {str(origin)[:40]!r}")
        return cls(qid, data["question"], at=data.get("at"), every=data.get("every"), origin=origin, meta=dict(meta),
                   wait=data.get("wait", False))

    def to_dict(self) -> dict:
        """The question in the schema's fields (what a saved state holds; `from_dict(..., "state")` reads it)."""
        return dict(id=self.id, question=self.text, at=self.at, every=self.every, wait=self.wait, origin=self.origin,
                    meta=self.meta)


def question_text(text) -> str:
    """The one rule for a question's text, whatever the transport: a non-empty string of at most
    MAX_QUESTION_CHARS characters, without control characters (tab and newlines aside) or unpaired
    surrogates. The chat template's control tokens (`<|im_end|>`, ...) are neither refused nor
    rewritten: they are text, which the adapter tokenizes as the plain characters they are written with."""
    if not isinstance(text, str) or not text.strip():
        raise BadQuestion("question text must be a non-empty string")
    if len(text) > MAX_QUESTION_CHARS:
        raise BadQuestion(f"question text is {len(text)} characters; the limit is {MAX_QUESTION_CHARS}")
    if any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n\r" for c in text):
        raise BadQuestion("question text holds control characters or unpaired surrogates; questions are text")
    return text


def _short(value) -> str:
    """A value for an error message: a huge number is named by its size, not printed."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        digits = int(abs(value).bit_length() * math.log10(2))  # str() of a huge int is refused (4300 digits)
        digits += abs(value) >= 10**digits
        return f"an integer of {digits} digits"
    return repr(value)[:40]


def _asker(question: Question) -> str:
    """Who asked: the HTTP client (its address, recorded by the server), else the transport."""
    client = question.meta.get("client") if isinstance(question.meta, dict) else None
    return client if isinstance(client, str) else question.origin


class QuestionQueue:
    """Thread-safe: producers (CLI, MQTT) submit from any thread; the stream loop takes.

    max_waiting: one-off questions that may wait; max_scheduled: questions with `at` (default:
    max_waiting); max_standing: standing questions (default: no limit, for the library);
    horizon: how far (s) beyond the stream's time `at` may lie (default: no limit).
    """

    def __init__(self, max_waiting: int = 64, *, max_scheduled: int | None = None, max_standing: int | None = None,
                 horizon: float | None = None) -> None:
        limits = dict(max_waiting=max_waiting, max_scheduled=max_scheduled or max_waiting,
                      max_standing=max_standing or 1 << 30)
        for name, value in limits.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if horizon is not None and not (isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a number of seconds > 0, got {horizon!r}")
        self.limits = {"one-off": limits["max_waiting"], "scheduled": limits["max_scheduled"],
                       "standing": limits["max_standing"]}
        self.max_waiting, self.horizon = max_waiting, horizon
        self.now = 0.0  # the stream's time as far as the queue knows (newest frame taken at)
        self._oneoff: list[Question] = []
        self._scheduled: list[Question] = []  # by `at`, then arrival
        self._standing: list[Question] = []
        self._known: OrderedDict[str, str] = OrderedDict()  # id -> text of every question accepted (newest kept)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._order = itertools.count()
        self._keys: list[tuple[float, int]] = []  # sort keys of _scheduled
        self._served: dict[str, int] = {}  # asker -> turn its last one-off question was taken (see take_due)
        self._turn = 0

    def new_id(self) -> str:
        """An id no question accepted so far has (restored questions keep theirs)."""
        with self._lock:
            while (candidate := f"q{next(self._ids)}") in self._known:
                pass
            return candidate

    def submit(self, question: Question) -> Question:
        """Accepts a question or raises `QueueFull` / `BadQuestion`; an accepted question will be answered."""
        with self._lock:
            known = self._known.get(question.id)
            if known is not None:
                same = known == question.text
                raise DuplicateId(f"id {question.id!r} was already used" + (
                    " for this question (a redelivery: it is answered once)" if same else
                    " for another question; give each question its own id"), same)
            kind = question.kind
            if kind == "scheduled" and self.horizon is not None and question.at > self.now + self.horizon:
                raise BadQuestion(f"'at' = {question.at:g} s is more than {self.horizon:g} s (the horizon) beyond "
                                  f"the stream's time {self.now:.1f} s; question {question.id!r} was not accepted")
            held = {"one-off": self._oneoff, "scheduled": self._scheduled, "standing": self._standing}[kind]
            if len(held) >= self.limits[kind]:
                advice = ("cancel one (<stream>/cancel with its id) to ask another" if kind == "standing"
                          else "retry later")
                raise QueueFull(f"{len(held)} {kind} questions are held (the limit is {self.limits[kind]}); "
                                f"question {question.id!r} was not accepted, {advice}")
            if kind == "scheduled":
                key = (question.at, next(self._order))
                i = bisect.bisect(self._keys, key)
                self._keys.insert(i, key)
                self._scheduled.insert(i, question)
            else:
                held.append(question)
            self._known[question.id] = question.text
            while len(self._known) > REMEMBERED_IDS:
                self._known.popitem(last=False)
            return question

    def cancel(self, question_id: str) -> Question:
        """Removes a waiting or standing question; BadQuestion if none has that id."""
        with self._lock:
            for held in (self._standing, self._scheduled, self._oneoff):
                for i, q in enumerate(held):
                    if q.id == question_id:
                        del held[i]
                        if held is self._scheduled:
                            del self._keys[i]
                        return q
        raise BadQuestion(f"no waiting or standing question has id {question_id!r} (answered already, or never "
                          f"asked)")

    def observers(self) -> list[str]:
        """Texts of the waiting and standing questions, waiting first (one-off, then the soonest scheduled)."""
        with self._lock:
            return list(dict.fromkeys(q.text for q in self._oneoff + self._scheduled + self._standing))

    def take_due(self, stream_time: float | None, chunks_folded: int, chunk_just_folded: bool,
                 video: bool = True, limit: int | None = None) -> list[Question]:
        """Removes and returns waiting questions due now; adds standing ones due after this chunk.
        Without `video` (the stream has no frames yet), questions that asked to wait are not due.
        limit: at most this many one-off and scheduled questions (the runner takes them one at a time, so
        that folding keeps its share; the others stay waiting, cancellable). With a limit, one-off questions
        are taken in turn by asker (`meta["client"]`, else `origin`): the one served least recently first, so
        a client that keeps its share of the queue full does not stand before another's every question."""
        with self._lock:
            if stream_time is not None:
                self.now = max(self.now, stream_time)
            due = [q for q in self._oneoff if video or not q.wait]
            if limit is not None:
                due = sorted(due, key=lambda q: self._served.get(_asker(q), -1))[:limit]  # stable: FIFO per asker
                for q in due:
                    self._turn += 1
                    self._served[_asker(q)] = self._turn
                if len(self._served) > REMEMBERED_IDS:  # askers long gone: forgetting one only moves it first
                    self._served.clear()
            taken = {id(q) for q in due}
            self._oneoff = [q for q in self._oneoff if id(q) not in taken]
            room = None if limit is None else limit - len(due)
            n = 0
            while (n < len(self._scheduled) and stream_time is not None and self._scheduled[n].at <= stream_time
                   and (room is None or n < room)):
                n += 1
            due += self._scheduled[:n]
            del self._scheduled[:n], self._keys[:n]
            if chunk_just_folded:
                due += [q for q in self._standing if chunks_folded % q.every == 0]
            return due

    def take_on_time(self, after: float | None, stream_time: float) -> list[Question]:
        """Removes and returns the scheduled questions that came due as the stream went from `after` (None: its
        start) to `stream_time`: at in (after, stream_time]. They are answered there, whatever else waits (one
        asked with an `at` already past is due at once, like a one-off, and waits its turn like one)."""
        with self._lock:
            self.now = max(self.now, stream_time)
            first = 0 if after is None else bisect.bisect_right(self._keys, (after, math.inf))
            last = bisect.bisect_right(self._keys, (stream_time, math.inf))
            due = self._scheduled[first:last]
            del self._scheduled[first:last], self._keys[first:last]
            return due

    def take_all(self) -> list[Question]:
        """Every waiting question, due or not: the end of a finite stream answers them all."""
        with self._lock:
            out = self._oneoff + self._scheduled
            self._oneoff, self._scheduled, self._keys = [], [], []
            return out

    def snapshot(self) -> list[dict]:
        """Waiting and standing questions in the schema's fields (`Question.to_dict`: saved state, status)."""
        with self._lock:
            return [q.to_dict() for q in self._oneoff + self._scheduled + self._standing]

    def ids(self) -> set[str]:
        """Ids of the waiting and standing questions."""
        with self._lock:
            return {q.id for q in self._oneoff + self._scheduled + self._standing}

    def waiting(self) -> int:
        """One-off and scheduled questions waiting."""
        with self._lock:
            return len(self._oneoff) + len(self._scheduled)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"one-off": len(self._oneoff), "scheduled": len(self._scheduled), "standing": len(self._standing)}
