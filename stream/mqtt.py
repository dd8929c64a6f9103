"""MQTT: questions in on `<prefix>/<stream>/ask`, cancellations on `.../cancel`; answers, errors,
cancellations and status out (aiomqtt).

The bridge runs its own asyncio loop in a thread. Every message is handled on its own: a
payload that is not valid (too big, too deep, numbers or strings too long, wrong types) or
that fails in any other way gets a message on the error topic naming the problem, and
nothing else changes; nothing a client sends can stop the bridge.

No accepted question is lost: the bridge keeps one persistent session per stream (a fixed
client id, clean_session=False), so QoS 1 questions published while it was away are
delivered when it is back; a question redelivered with the same id is answered once.
Answers (QoS 1) wait in an outbox until the broker has them: when the broker goes away the
bridge reconnects with backoff and publishes what is waiting. QoS 1 is "at least once": an
answer whose acknowledgement was lost with the connection is published again, so clients
dedupe answers by `question_id`.

The bridge speaks MQTT 5 and announces a Maximum Packet Size of the payload limit plus header
room, so the broker drops a bigger message instead of sending it (it is never read into memory);
a broker that refuses MQTT 5 gets 3.1.1, with a warning that the limit is then checked only
after a message is read. A retained message on the ask or cancel topic is ignored (a note goes
to the error topic): it would otherwise be asked again at every reconnection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

from sinks import AnswerEvent, Sink, json_text

from .config import ConfigError, MqttConfig, check_stream_id
from .payload import read_json
from .questions import BadQuestion, DuplicateId, Question, QuestionQueue, QueueFull, check_id

log = logging.getLogger("emloc_stream")
MAX_OUTBOX = 10_000  # messages held while the broker is away; beyond that the oldest go, loudly
REFUSED_CONNECT = {4: "bad user name or password", 5: "not authorized", 134: "bad user name or password",
                   135: "not authorized"}
REFUSED_VERSION = {1, 132}  # "unacceptable protocol version" (3.1.1) / "unsupported protocol version" (5)
HEADER_ROOM = 1024  # bytes of a PUBLISH beyond payload and topic: fixed header, packet id, properties
NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5 session expiry: the broker keeps the session as 3.1.1's clean_session=False


class MqttBridge(Sink):
    """One stream's MQTT side. As a Sink it publishes answers; `publish_status`/`publish_error`
    may be called from any thread. Counters (received, accepted, refused, redelivered, cancelled)
    say what happened to the messages it read."""

    def __init__(self, broker: MqttConfig, stream_id: str, queue: QuestionQueue) -> None:
        self.broker, self.stream_id, self.queue = broker, check_stream_id(stream_id), queue
        self._tls = broker.ssl_context()  # ConfigError now, in the caller's thread, if unusable
        base = f"{broker.prefix}/{stream_id}"
        self.topics = dict(ask=f"{base}/ask", cancel=f"{base}/cancel", answer=f"{base}/answer",
                           error=f"{base}/error", status=f"{base}/status", cancelled=f"{base}/cancelled")
        self.client_id = f"emloc-stream-{stream_id}"  # fixed: the broker keeps this stream's session
        self.max_packet = broker.max_payload + HEADER_ROOM + max(len(t.encode()) for t in self.topics.values())
        self.protocol = 5  # until a broker refuses it; then 3.1.1
        self._outbox: deque[tuple[str, bytes, int]] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = threading.Event()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.tried = threading.Event()  # the first connection attempt has an outcome
        self.refused = ""  # the broker refused our credentials or TLS: retrying will not help
        self.connects = 0
        self.last_error = ""
        self.counts = dict(received=0, accepted=0, refused=0, redelivered=0, cancelled=0, failed=0, retained=0)
        self._thread = threading.Thread(target=self._main, name=f"mqtt:{stream_id}", daemon=True)

    # --- used by the stream loop (any thread) ----------------------------------------
    def start(self) -> MqttBridge:
        self._thread.start()
        return self

    def check_connect(self, timeout: float = 10.0, stop: threading.Event | None = None) -> None:
        """Waits for the first connection attempt: ConfigError if the broker refused the credentials
        or the TLS handshake (one line, at start); a broker that is merely away is retried.
        stop: set (Ctrl-C) while waiting, the wait ends at once."""
        deadline = time.monotonic() + timeout
        while not self.tried.wait(0.05) and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return
        if self.refused:
            self.close(timeout=0)
            raise ConfigError(f"MQTT broker {self.broker.host}:{self.broker.port}: {self.refused}")
        if not self.connected.is_set():
            log.warning("mqtt: %s:%s not reachable yet (%s); retrying in the background", self.broker.host,
                        self.broker.port, self.last_error or "no answer")

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
        if self._thread.is_alive():  # at most a second: one still trying to connect ends on its own (a daemon)
            self._thread.join(timeout=1.0)
        if self.pending():
            log.error("mqtt: %d message(s) could not be published before exit", self.pending())

    def _send(self, topic: str, data: dict, qos: int, replace: bool = False) -> None:
        payload = json_text(data).encode("utf-8", "replace")
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
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the bridge's loop has ended (closing): the outbox is reported there
                pass

    # --- handling one message (the bridge's thread) ----------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """One incoming message: never raises; every refusal goes to the error topic."""
        self.counts["received"] += 1
        qid = None
        try:
            data = read_json(payload, self.broker.max_payload)
            try:
                qid = check_id(data["id"]) if "id" in data else None
            except BadQuestion:
                pass
            if topic == self.topics["cancel"]:
                if set(data) != {"id"}:
                    raise BadQuestion("a cancel payload is {\"id\": <id of a waiting or standing question>}")
                question = self.queue.cancel(check_id(data["id"]))
                self.counts["cancelled"] += 1
                self._send(self.topics["cancelled"], {"stream_id": self.stream_id, "id": question.id,
                                                      "question": question.text, "kind": question.kind}, qos=1)
                return
            self.queue.submit(Question.from_dict(data, "mqtt", new_id=self.queue.new_id))
            self.counts["accepted"] += 1
        except DuplicateId as error:
            if error.same:  # QoS 1 delivered it again: the first copy is (or was) answered
                self.counts["redelivered"] += 1
                return
            self.counts["refused"] += 1
            self.publish_error(str(error), qid)
        except (BadQuestion, QueueFull) as error:
            self.counts["refused"] += 1
            self.publish_error(str(error), qid)
        except Exception as error:  # a bug must cost this message, never the bridge
            self.counts["failed"] += 1
            log.exception("mqtt: failed to handle a message on %s", topic)
            self.publish_error(f"could not handle the message: {type(error).__name__}", qid)

    # --- the bridge's own thread -------------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception:  # noqa: BLE001 - the stream goes on; its answers still reach the other sinks
            log.exception("mqtt: the bridge for %s stopped", self.stream_id)
        finally:
            self.tried.set()

    async def _serve(self) -> None:
        import aiomqtt

        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        delay = self.broker.backoff[0]
        while not self._stopping.is_set():
            try:
                async with aiomqtt.Client(self.broker.host, self.broker.port, username=self.broker.username,
                                          password=self.broker.password, tls_context=self._tls, timeout=5,
                                          identifier=self.client_id, **self._session()) as client:
                    self.connects += 1
                    self.connected.set()
                    self.tried.set()
                    await client.subscribe([(self.topics["ask"], 1), (self.topics["cancel"], 1)])
                    self.subscribed.set()
                    delay = self.broker.backoff[0]
                    log.info("mqtt: connected to %s:%s", self.broker.host, self.broker.port)
                    reader = asyncio.create_task(self._read(client))
                    try:
                        await self._write(client, reader)
                    finally:
                        reader.cancel()
                        await asyncio.gather(reader, return_exceptions=True)
                        self._drain(client)
            except aiomqtt.MqttError as error:
                self.last_error = str(error)
                code = getattr(getattr(error, "rc", None), "value", getattr(error, "rc", None))
                if code in REFUSED_VERSION and self.protocol == 5:
                    self.protocol = 4
                    log.warning("mqtt: %s:%s refused MQTT 5; using 3.1.1, where the broker may send payloads up to "
                                "its own limit (read, then refused beyond %d bytes)", self.broker.host,
                                self.broker.port, self.broker.max_payload)
                    continue
                if code in REFUSED_CONNECT:
                    self.refused = f"the broker refused the credentials ({REFUSED_CONNECT[code]})"
                elif "SSL" in str(error).upper():
                    self.refused = f"TLS failed: {error}"
            except Exception as error:  # noqa: BLE001 - anything else: report, back off, reconnect
                self.last_error = f"{type(error).__name__}: {error}"
                log.exception("mqtt: unexpected error in the bridge for %s", self.stream_id)
            self.connected.clear()
            self.subscribed.clear()
            self.tried.set()
            if self._stopping.is_set():
                break
            log.warning("mqtt: %s:%s unavailable (%s); retrying in %.1f s", self.broker.host, self.broker.port,
                        self.last_error, delay)
            await self._sleep(delay)
            delay = min(delay * 2, self.broker.backoff[1])

    def _session(self) -> dict:
        """aiomqtt's arguments for a persistent session: MQTT 5 with a Maximum Packet Size, or 3.1.1."""
        from aiomqtt import ProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if self.protocol == 4:
            return dict(protocol=ProtocolVersion.V311, clean_session=False)
        properties = Properties(PacketTypes.CONNECT)
        properties.MaximumPacketSize = self.max_packet
        properties.SessionExpiryInterval = NEVER_EXPIRES
        return dict(protocol=ProtocolVersion.V5, clean_start=False, properties=properties)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _read(self, client) -> None:
        async for message in client.messages:
            self._handle_message(message)

    def _drain(self, client) -> None:
        """Messages the client library received (and acknowledged) before the connection dropped."""
        queue = getattr(client, "_queue", None)  # aiomqtt's incoming queue; not public API
        while queue is not None and not queue.empty():
            self._handle_message(queue.get_nowait())

    def _handle_message(self, message) -> None:
        if message.retain:  # kept by the broker and sent at every subscription: not a question asked now
            self.counts["retained"] += 1
            self.publish_error(f"a retained message on {message.topic} is ignored: publish questions and "
                               f"cancellations with retain off (clear it with an empty retained message)")
            return
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "replace")
        elif not isinstance(payload, (bytes, bytearray)):
            payload = b"" if payload is None else str(payload).encode()
        self.handle(str(message.topic), bytes(payload))

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
