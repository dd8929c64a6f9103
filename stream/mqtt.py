"""MQTT: questions in on `<prefix>/<stream>/ask`, answers, errors and status out (aiomqtt).

The bridge runs its own asyncio loop in a thread. Questions are validated and put on the
stream's queue; a bad payload gets a message on the error topic naming the problem and
nothing else changes. Answers (QoS 1) wait in an outbox until the broker has them: when
the broker goes away the bridge reconnects with backoff and publishes what is waiting, so
no accepted question goes unanswered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
from collections import deque

from sinks import AnswerEvent, Sink

from .config import MqttConfig
from .questions import BadQuestion, Question, QuestionQueue, QueueFull

log = logging.getLogger("emloc_stream")
ASK_FIELDS = {"id", "question", "at", "every"}
MAX_OUTBOX = 10_000  # messages held while the broker is away; beyond that the oldest go, loudly


def parse_ask(payload: bytes, queue: QuestionQueue, max_payload: int) -> Question:
    """The question in an ask payload, or BadQuestion saying what is wrong with it."""
    if len(payload) > max_payload:
        raise BadQuestion(f"payload of {len(payload)} bytes exceeds the limit of {max_payload}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadQuestion(f"payload is not JSON: {error}") from error
    if not isinstance(data, dict):
        raise BadQuestion(f"payload must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - ASK_FIELDS)
    if unknown:
        raise BadQuestion(f"unknown field(s) {unknown}; known fields are {sorted(ASK_FIELDS)}")
    if "question" not in data:
        raise BadQuestion("missing field 'question'")
    if not isinstance(data["question"], str):
        raise BadQuestion(f"'question' must be a string, got {type(data['question']).__name__}")
    qid = data.get("id", queue.new_id())
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise BadQuestion(f"'id' must be a string or an integer, got {type(qid).__name__}")
    return Question(str(qid), data["question"], at=data.get("at"), every=data.get("every"), origin="mqtt")


class MqttBridge(Sink):
    """One stream's MQTT side. As a Sink it publishes answers; `publish_status`/`publish_error`
    may be called from any thread."""

    def __init__(self, broker: MqttConfig, stream_id: str, queue: QuestionQueue) -> None:
        self.broker, self.stream_id, self.queue = broker, stream_id, queue
        base = f"{broker.prefix}/{stream_id}"
        self.topics = dict(ask=f"{base}/ask", answer=f"{base}/answer", error=f"{base}/error", status=f"{base}/status")
        self._outbox: deque[tuple[str, bytes, int]] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = threading.Event()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.connects = 0
        self.last_error = ""
        self.persistent = False  # True: the broker keeps this client's subscription and QoS 1 questions while away
        self._thread = threading.Thread(target=self._main, name=f"mqtt:{stream_id}", daemon=True)

    # --- used by the stream loop (any thread) ----------------------------------------
    def start(self) -> MqttBridge:
        self._thread.start()
        return self

    def deliver(self, event: AnswerEvent) -> None:
        self._send(self.topics["answer"], event.to_dict(), qos=1)

    def publish_status(self, status: dict) -> None:
        self._send(self.topics["status"], status, qos=0, replace=True)

    def publish_error(self, message: str, question_id: str | None = None) -> None:
        self._send(self.topics["error"], {"stream_id": self.stream_id, "id": question_id, "error": message}, qos=1)

    def pending(self) -> int:
        with self._lock:
            return len(self._outbox)

    def close(self, timeout: float = 5.0) -> None:
        """Publishes what is waiting (up to `timeout` s), then disconnects."""
        waited = 0.0
        while self.pending() and self.connected.is_set() and waited < timeout:
            self._stopping.wait(0.05)
            waited += 0.05
        self._stopping.set()
        self._poke()
        self._thread.join(timeout=timeout)
        if self.pending():
            log.error("mqtt: %d message(s) could not be published before exit", self.pending())

    def _send(self, topic: str, data: dict, qos: int, replace: bool = False) -> None:
        payload = json.dumps(data, ensure_ascii=False).encode()
        with self._lock:
            if replace:  # only the newest status matters
                self._outbox = deque(m for m in self._outbox if m[0] != topic)
            self._outbox.append((topic, payload, qos))
            if len(self._outbox) > MAX_OUTBOX:
                lost = self._outbox.popleft()
                log.error("mqtt: broker unreachable and %d messages waiting: dropped the oldest, for %s "
                          "(answers also go to the other sinks)", MAX_OUTBOX, lost[0])
        self._poke()

    def _poke(self) -> None:
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    # --- the bridge's own thread -------------------------------------------------------
    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        import aiomqtt

        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        delay = self.broker.backoff[0]
        tls = None
        if self.broker.tls:
            tls = ssl.create_default_context(cafile=self.broker.ca_file)
        while not self._stopping.is_set():
            try:
                async with aiomqtt.Client(self.broker.host, self.broker.port, username=self.broker.username,
                                          password=self.broker.password, tls_context=tls, timeout=5,
                                          identifier=f"emloc-stream-{self.stream_id}",
                                          clean_session=False if self.persistent else None) as client:
                    self.connects += 1
                    self.connected.set()
                    await client.subscribe(self.topics["ask"], qos=1)
                    self.subscribed.set()
                    delay = self.broker.backoff[0]
                    log.info("mqtt: connected to %s:%s", self.broker.host, self.broker.port)
                    reader = asyncio.create_task(self._read(client))
                    try:
                        await self._write(client, reader)
                    finally:
                        reader.cancel()
                        await asyncio.gather(reader, return_exceptions=True)
            except aiomqtt.MqttError as error:
                self.last_error = str(error)
            self.connected.clear()
            self.subscribed.clear()
            if self._stopping.is_set():
                break
            log.warning("mqtt: %s:%s unavailable (%s); retrying in %.1f s", self.broker.host, self.broker.port,
                        self.last_error, delay)
            await self._sleep(delay)
            delay = min(delay * 2, self.broker.backoff[1])

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _read(self, client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                question = parse_ask(payload, self.queue, self.broker.max_payload)
                self.queue.submit(question)
            except (BadQuestion, QueueFull) as error:
                qid = _id_of(payload)
                self.publish_error(str(error), qid)

    async def _write(self, client, reader: asyncio.Task) -> None:
        """Publishes the outbox in order; a message leaves it only once the broker took it."""
        while not (self._stopping.is_set() and not self._outbox):
            if reader.done():  # the connection dropped under the reader
                reader.result()
                return
            with self._lock:
                message = self._outbox[0] if self._outbox else None
            if message is None:
                await self._sleep(0.2)
                continue
            topic, payload, qos = message
            await client.publish(topic, payload, qos=qos)
            with self._lock:
                if self._outbox and self._outbox[0] is message:
                    self._outbox.popleft()


def _id_of(payload: bytes) -> str | None:
    try:
        data = json.loads(payload.decode("utf-8"))
        qid = data.get("id") if isinstance(data, dict) else None
        return str(qid) if isinstance(qid, (str, int)) and not isinstance(qid, bool) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
