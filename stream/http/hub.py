"""What the HTTP server knows of one stream, learnt by subscription (never from the runner's insides).

A `StreamHub` is subscribed to its `LiveStream`: as a Sink it receives every answer, and it is told
of folds and errors. It keeps the newest answers (numbered, for paging), a short history of the
cache size, and passes events to the server-sent-event clients and to requests waiting for one
answer. Questions asked over HTTP enter its stream's queue through `submit`, which holds each
client to its share of the one-off queue, and leave it through `abandon` when their client goes.
Sinks are called from the serving thread; clients live on the server's asyncio loop, so events
cross over with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque

from fastapi import HTTPException

from sinks import AnswerEvent, Sink

from ..questions import BadQuestion, Question, QueueFull

KEEP_ANSWERS = 1000  # newest answers held for GET .../answers
KEEP_HISTORY = 600  # status samples held for the page's chart
CLIENT_BACKLOG = 256  # events an SSE client may fall behind before it is cut off
EVENT_KINDS = ("answer", "error", "status")  # what a listener gets unless it asks for "fold" too (realtime sessions)


class StreamHub(Sink):
    def __init__(self, stream, metrics=None, client_share: float = 1.0) -> None:
        self.stream, self.id, self.metrics = stream, stream.spec.id, metrics
        self.client_share = client_share
        self.answer_s = 1.0  # typical seconds per answer (moving average): what a 429 says to wait
        self._held: dict[str, set[str]] = {}  # client -> ids of its one-off questions (some answered since)
        self.answers: deque[dict] = deque(maxlen=KEEP_ANSWERS)
        self.history: deque[dict] = deque(maxlen=KEEP_HISTORY)
        self.latest_by_question: dict[str, dict] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: dict[asyncio.Queue, tuple[str, ...]] = {}  # listener -> the kinds of event it wants
        self._waiting: dict[str, asyncio.Future] = {}
        stream.subscribe(self)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # --- told by the stream (serving thread) ------------------------------------------
    def deliver(self, event: AnswerEvent) -> None:
        with self._lock:
            self._seq += 1
            data = dict(event.to_dict(), seq=self._seq)
            self.answers.append(data)
            self.latest_by_question[event.question_id] = data
        if self.metrics is not None:
            self.metrics.observe_answer(self.id, event.latency_s)
        self.answer_s = 0.8 * self.answer_s + 0.2 * event.latency_s
        self._publish("answer", data)
        self._settle(event.question_id, data, None)

    def on_fold(self, record) -> None:
        if self.metrics is not None:
            self.metrics.observe_fold(self.id, record)
        self._publish("fold", dict(stream_id=self.id, chunk=record.index, frames=record.frames,
                                   time_span=record.time_span,
                                   cache_tokens=round(sum(record.tokens_after) / max(1, len(record.tokens_after)))))

    def on_error(self, question_id: str | None, message: str) -> None:
        self._publish("error", {"stream_id": self.id, "question_id": question_id, "error": message})
        if question_id is not None:
            self._settle(question_id, None, message)

    # --- used by the server (its loop) -------------------------------------------------
    def submit(self, question: Question, client: str) -> Question:
        """Queues `question` for `client`, or HTTPException: 429 (with Retry-After) when the queue, or the
        client's share of the one-off queue, is full; 422 when the queue refuses it."""
        queue = self.stream.queue
        retry = {"Retry-After": str(max(1, math.ceil(self.answer_s)))}
        held = None
        if question.kind == "one-off":
            held = self._held.get(client, set()) & queue.ids()  # those still waiting
            share = max(1, int(queue.limits["one-off"] * self.client_share))
            if len(held) >= share:
                raise HTTPException(429, f"{client} has {len(held)} one-off questions waiting on stream {self.id!r}, "
                                         f"its share of the queue ({share} of {queue.limits['one-off']}); ask again "
                                         f"once one is answered", retry)
        question.meta.setdefault("client", client)  # the queue takes one-off questions in turn by client
        try:
            queue.submit(question)
        except BadQuestion as error:
            raise HTTPException(422, str(error)) from error
        except QueueFull as error:
            raise HTTPException(429, str(error), retry) from error
        if held is not None:
            self._held[client] = held | {question.id}
        return question

    def abandon(self, question_id: str) -> bool:
        """Withdraws a question whose client went away before its answer; True if it was still waiting
        (so it is never computed), False if it is being (or was) answered."""
        self.forget(question_id)
        try:
            self.stream.queue.cancel(question_id)
        except BadQuestion:
            return False
        if self.metrics is not None:
            self.metrics.abandoned[self.id] = self.metrics.abandoned.get(self.id, 0) + 1
        return True

    def status(self) -> dict:
        status = self.stream.status()
        status["standing"] = [dict(q, latest=self.latest_by_question.get(q["id"]))
                              for q in self.stream.queue.snapshot() if q["every"]]
        status["waiting"] = self.stream.queue.waiting()
        return status

    def sample(self) -> dict:
        """Records one point of the cache-size history and tells the SSE clients the status."""
        status = self.status()
        point = dict(time=round(time.time(), 2), cache_tokens=status["cache_tokens"],
                     chunks_folded=status["chunks_folded"], lag_s=status["lag_s"])
        self.history.append(point)
        self._publish("status", status)
        waiting = self.stream.queue.ids()
        self._held = {client: ids & waiting for client, ids in self._held.items() if ids & waiting}
        return status

    def answers_since(self, since: int, limit: int) -> list[dict]:
        with self._lock:
            return [a for a in self.answers if a["seq"] > since][:limit]

    def newest_seq(self) -> int:
        with self._lock:
            return self._seq

    def listen(self, kinds: tuple[str, ...] = EVENT_KINDS) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=CLIENT_BACKLOG + 1)
        self._clients[queue] = kinds
        return queue

    def unlisten(self, queue: asyncio.Queue) -> None:
        self._clients.pop(queue, None)

    def expect(self, question_id: str) -> asyncio.Future:
        """A future for the answer (or error) to `question_id`; register it before submitting."""
        future = asyncio.get_running_loop().create_future()
        self._waiting[question_id] = future
        return future

    def forget(self, question_id: str) -> None:
        self._waiting.pop(question_id, None)

    # --- crossing into the loop ----------------------------------------------------------
    def _publish(self, kind: str, data: dict) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fan_out, kind, data)

    def _fan_out(self, kind: str, data: dict) -> None:
        for queue, kinds in list(self._clients.items()):
            if kind not in kinds:
                continue
            if queue.qsize() >= CLIENT_BACKLOG:  # a client that stopped reading: cut it off, hold no memory
                self._clients.pop(queue, None)
                queue.put_nowait(("overflow", {}))  # the reader takes this as the end
            else:
                queue.put_nowait((kind, data))

    def _settle(self, question_id: str, answer: dict | None, error: str | None) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._resolve, question_id, answer, error)

    def _resolve(self, question_id: str, answer: dict | None, error: str | None) -> None:
        future = self._waiting.pop(question_id, None)
        if future is not None and not future.done():
            future.set_result((answer, error))
