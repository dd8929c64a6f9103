"""Frigate bridge (`--frigate HOST:PORT`, or a `frigate:` config section): every object Frigate tracks on a
watched camera gets the configured questions asked over that camera's stream, for the event's time span.

Frigate (the open-source NVR) publishes each tracked object on `<frigate prefix>/events` (default
`frigate/events`) as `{"type": "new" | "update" | "end", "before": {...}, "after": {...}}`, where `after`
holds the object's `id`, `camera`, `label`, `start_time` and `end_time` (Unix seconds; `end_time` is null
until the `end` message). For an event on a watched camera (and label, if labels are given):

- `new`: each question is put in the stream's queue, scheduled `max_event_s` after the event's start, so
  it is an observer (it guides what the cache keeps) while the event's frames are folded;
- `end`: those questions are withdrawn and asked again, scheduled at the event's end, so each is answered
  once the stream has folded the event (at once if it already has); an event first seen at its end is
  asked then. `update` messages change nothing.

Times: Frigate's are wall-clock; a stream's are seconds from its first frame. The source ties the two at
its least-delayed frame since it (re)connected (`LiveSource.clock_origin`), so a camera whose frames reach
us L seconds after Frigate's shifts an event's span by L.

Answers go to the Frigate broker, where Frigate and Home Assistant users look for them:
- `<mqtt prefix>/<stream>/frigate/answer` (QoS 1): one message per question and event, with the event's
  id, camera, label, start and end (Unix s), its span in stream time and the answer's;
- `<frigate prefix>/tracked_object_update` (QoS 1): `{"type": "description", "id", "description"}` once
  every question of an event is answered, the message Frigate's own GenAI descriptions use;
- with `--ha-discovery`: one Home Assistant sensor per stream and question (retained config on
  `homeassistant/sensor/emloc_<stream>/frigate_<object>/config`), whose state is the newest event's answer
  and whose attributes are that event's fields; available while `<mqtt prefix>/frigate/available` says
  `online` (this client's last will says `offline`).

Every payload is untrusted: it is read with the limits of every transport's JSON (stream/payload.py); a
malformed one, an unknown event type, a camera not watched (once per camera) or a label not asked about is
named in one log line and costs nothing else.
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
from dataclasses import dataclass, field

from sinks import AnswerEvent, Sink, json_text

from .config import ConfigError, MqttConfig, check_stream_id
from .ha import DISCOVERY_PREFIX, object_id, safe_id
from .payload import read_json
from .questions import BadQuestion, DuplicateId, Question, QueueFull, check_id

log = logging.getLogger("emloc_stream")
EVENT_TYPES = ("new", "update", "end")
MAX_LABEL_CHARS = 64


class BadEvent(ValueError):
    """A Frigate event payload that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class FrigateEvent:
    type: str  # new, update, end
    id: str
    camera: str
    label: str
    start_time: float  # Unix seconds
    end_time: float | None  # Unix seconds; None until the event ends

    def to_dict(self) -> dict:
        return dict(event_id=self.id, camera=self.camera, label=self.label, start_time=self.start_time,
                    end_time=self.end_time)


def parse_event(payload: bytes, max_payload: int) -> FrigateEvent:
    """The event a `frigate/events` payload describes (its `after` state), or BadEvent naming what is wrong."""
    try:
        data = read_json(payload, max_payload)
    except BadQuestion as error:  # its message speaks of questions, the JSON most transports carry
        raise BadEvent(str(error).replace("a question must be", "an event must be")) from None
    kind = data.get("type")
    if kind not in EVENT_TYPES:
        raise BadEvent(f"unknown event type {str(kind)[:40]!r}; Frigate sends {', '.join(EVENT_TYPES)}")
    after = data.get("after")
    if not isinstance(after, dict):
        raise BadEvent("no 'after' object (the tracked object's state)")
    try:
        event_id = check_id(after.get("id"))
    except BadQuestion as error:
        raise BadEvent(f"after.id: {error}") from None
    camera, label = after.get("camera"), after.get("label")
    for name, value in (("camera", camera), ("label", label)):
        if not isinstance(value, str) or not value or len(value) > MAX_LABEL_CHARS or not value.isprintable():
            raise BadEvent(f"after.{name} must be 1 to {MAX_LABEL_CHARS} printable characters, got "
                           f"{str(value)[:40]!r}")
    start, end = after.get("start_time"), after.get("end_time")
    if not _time(start):
        raise BadEvent(f"after.start_time must be Unix seconds, got {str(start)[:40]!r}")
    if end is not None and (not _time(end) or end < start):
        raise BadEvent(f"after.end_time must be null or Unix seconds not before start_time, got {str(end)[:40]!r}")
    if kind == "end" and end is None:
        raise BadEvent("an 'end' event without after.end_time")
    return FrigateEvent(kind, event_id, camera, label, float(start), None if end is None else float(end))


def _time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class FrigateConfig:
    """broker: Frigate's MQTT broker, its `prefix` Frigate's topic_prefix. cameras: Frigate camera -> stream id.
    labels: the object labels asked about (all if empty). max_event_s: the longest an event's questions wait."""

    broker: MqttConfig
    ask: tuple[str, ...]
    cameras: dict = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    max_event_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.ask or not all(isinstance(q, str) and q.strip() for q in self.ask):
            raise ConfigError("frigate: give the questions to ask about each event (--frigate-ask, or ask: [...])")
        for camera, stream in self.cameras.items():
            if not isinstance(camera, str) or not camera:
                raise ConfigError(f"frigate.cameras: a camera name must be a string, got {camera!r}")
            check_stream_id(stream)
        if not all(isinstance(label, str) and label for label in self.labels):
            raise ConfigError(f"frigate.labels must be object labels (person, car, ...), got {list(self.labels)}")
        if isinstance(self.max_event_s, bool) or not isinstance(self.max_event_s, (int, float)) \
                or not 0 < self.max_event_s <= 86400:
            raise ConfigError(f"frigate.max_event_s must be seconds in (0, 86400], got {self.max_event_s!r}")

    def watched(self, stream_ids: list[str]) -> dict:
        """Frigate camera -> stream id (by default every stream, its id the camera's name); ConfigError naming
        a stream that is not served."""
        cameras = self.cameras or {stream_id: stream_id for stream_id in stream_ids}
        missing = sorted(set(cameras.values()) - set(stream_ids))
        if missing:
            raise ConfigError(f"frigate.cameras names stream(s) {missing} that are not served; streams: "
                              f"{sorted(stream_ids)}")
        return cameras

    @classmethod
    def from_dict(cls, data) -> FrigateConfig:
        """The `frigate:` section of a config: the broker's keys as in `mqtt:` (prefix: Frigate's topic_prefix,
        default frigate), ask: [questions], cameras: {frigate camera: stream id}, labels: [...], max_event_s."""
        if not isinstance(data, dict):
            raise ConfigError("frigate must be a mapping (host, port, ask, cameras, ...)")
        own = {"ask", "cameras", "labels", "max_event_s"}
        broker_keys = {"host", "port", "username", "password", "tls", "ca_file", "prefix", "max_payload", "backoff"}
        unknown = sorted(set(data) - own - broker_keys)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in frigate; known keys are {sorted(own | broker_keys)}")
        broker = {k: v for k, v in data.items() if k in broker_keys}
        broker.setdefault("prefix", "frigate")
        broker.setdefault("max_payload", 65536)  # an event with its snapshot and zones is a few KiB
        cameras = data.get("cameras") or {}
        if not isinstance(cameras, dict):
            raise ConfigError("frigate.cameras must map Frigate camera names to stream ids")
        return cls(broker=_broker(**broker), ask=tuple(data.get("ask") or ()), cameras=dict(cameras),
                   labels=tuple(data.get("labels") or ()), max_event_s=data.get("max_event_s", 300.0))


def _broker(**options) -> MqttConfig:
    try:
        return MqttConfig(**options)
    except ConfigError as error:
        raise ConfigError(f"frigate: {str(error).replace('mqtt.', 'frigate.')}") from error


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frigate", metavar="HOST:PORT", help="Frigate's MQTT broker: each object Frigate tracks on this "
                   "stream's camera (frigate/events) gets the --frigate-ask questions asked over its time span; "
                   "answers on emloc/<stream>/frigate/answer and frigate/tracked_object_update (credentials: "
                   "--mqtt-user/--mqtt-password/--mqtt-tls/--mqtt-ca)")
    p.add_argument("--frigate-camera", metavar="NAME", help="the Frigate camera this stream shows (default: the "
                   "stream id)")
    p.add_argument("--frigate-ask", action="append", metavar="QUESTION", help="a question asked about each event "
                   "(repeatable)")
    p.add_argument("--frigate-label", action="append", metavar="LABEL", help="only events of this object label, "
                   "e.g. person (repeatable; default: every label)")
    p.add_argument("--frigate-prefix", default="frigate", help="Frigate's mqtt.topic_prefix (default frigate)")


def config_from(args: argparse.Namespace, config_section, stream_ids: list[str]) -> FrigateConfig | None:
    """`live`'s --frigate options, else a config's `frigate:` section; None when neither is given."""
    config = _config_from(args, config_section)
    if config is not None:
        config.watched(stream_ids)
    return config


def _config_from(args: argparse.Namespace, config_section) -> FrigateConfig | None:
    if getattr(args, "frigate", None):
        broker = MqttConfig.parse(args.frigate, username=args.mqtt_user, password=args.mqtt_password,
                                  tls=args.mqtt_tls, ca_file=args.mqtt_ca, prefix=args.frigate_prefix,
                                  max_payload=65536)
        return FrigateConfig(broker=broker, ask=tuple(args.frigate_ask or ()),
                             cameras={args.frigate_camera or args.stream_id: args.stream_id},
                             labels=tuple(args.frigate_label or ()))
    for option in ("frigate_ask", "frigate_camera", "frigate_label"):
        if getattr(args, option, None):
            raise ConfigError(f"--{option.replace('_', '-')} needs --frigate HOST:PORT (Frigate's MQTT broker)")
    if config_section is not None:
        return FrigateConfig.from_dict(config_section)
    return None


class FrigateBridge(Sink):
    """Reads Frigate's events, asks the streams, publishes the answers. As a Sink (subscribed to every watched
    stream) it sees every answer and publishes those of the questions it asked."""

    def __init__(self, config: FrigateConfig, streams: list, *, answer_prefix: str = "emloc",
                 ha_discovery: bool = False) -> None:
        import paho.mqtt.client as mqtt

        self.config, self.answer_prefix, self.ha_discovery = config, answer_prefix, ha_discovery
        by_id = {stream.spec.id: stream for stream in streams}
        cameras = config.watched(list(by_id))
        self.streams = {camera: by_id[stream_id] for camera, stream_id in cameras.items()}
        self.events_topic = f"{config.broker.prefix}/events"
        self.available_topic = f"{answer_prefix}/frigate/available"
        self.counts = dict(received=0, asked=0, ignored=0, refused=0, answered=0)
        self.unwatched: set[str] = set()  # cameras already named in the log
        self._asked: dict[str, tuple[FrigateEvent, str, bool]] = {}  # question id -> (event, stream id, final)
        self._answers: dict[str, dict[str, str]] = {}  # event id -> {question: answer} of its final questions
        self._lock = threading.Lock()
        self.connected = threading.Event()
        tls = config.broker.ssl_context()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"emloc-stream-frigate-"
                                  f"{'-'.join(sorted(by_id))}"[:64])
        if config.broker.username:
            self.client.username_pw_set(config.broker.username, config.broker.password)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.will_set(self.available_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(*[max(1, round(b)) for b in config.broker.backoff])
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.on_message = self._on_message
        for stream in self.streams.values():
            if self not in stream.listeners:
                stream.subscribe(self)

    def start(self) -> FrigateBridge:
        self.client.connect_async(self.config.broker.host, self.config.broker.port)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        """Says `offline` while the broker is there, then disconnects; never raises."""
        try:
            if self.connected.is_set():
                self.client.publish(self.available_topic, "offline", qos=1, retain=True).wait_for_publish(5)
        except (RuntimeError, ValueError) as error:
            log.warning("frigate: could not say offline: %s", error)
        self.client.disconnect()
        self.client.loop_stop()

    def close(self) -> None:
        """A stream closing: its last answers may still come (the bridge stops after every stream, `stop`)."""

    # --- events in ---------------------------------------------------------------------
    def handle(self, payload: bytes) -> None:
        """One `frigate/events` message: never raises; what is not asked is named in one log line."""
        self.counts["received"] += 1
        try:
            event = parse_event(bytes(payload), self.config.broker.max_payload)
        except BadEvent as error:
            self.counts["refused"] += 1
            log.warning("frigate: event ignored: %s", error)
            return
        stream = self.streams.get(event.camera)
        if stream is None:
            self.counts["ignored"] += 1
            if event.camera not in self.unwatched:
                self.unwatched.add(event.camera)
                log.warning("frigate: events from camera %r are ignored: not watched (watched: %s)", event.camera,
                            ", ".join(sorted(self.streams)))
            return
        if self.config.labels and event.label not in self.config.labels:
            self.counts["ignored"] += 1
            log.warning("frigate: event %s (%s on %s) ignored: label not in %s", event.id, event.label, event.camera,
                        list(self.config.labels))
            return
        if event.type == "update":
            return
        try:
            self._ask(stream, event)
        except Exception as error:  # a bug must cost this event, never the bridge
            self.counts["refused"] += 1
            log.exception("frigate: event %s on %s could not be asked: %s", event.id, event.camera, error)

    def _ask(self, stream, event: FrigateEvent) -> None:
        clock = stream.source.clock_origin  # the wall-clock time of the stream's time 0
        if clock is None:
            log.warning("frigate: event %s on %s not asked: stream %s has no video yet", event.id, event.camera,
                        stream.spec.id)
            return
        if event.type == "new":
            at, final = max(0.0, event.start_time - clock) + self.config.max_event_s, False
        else:
            at, final = max(0.0, event.end_time - clock), True
            for k in range(len(self.config.ask)):  # the observers that waited for the end
                try:
                    stream.queue.cancel(self._question_id(event, k, final=False))
                    with self._lock:
                        self._asked.pop(self._question_id(event, k, final=False), None)
                except BadQuestion:  # never asked (the event began before we listened), or already answered
                    pass
        for k, text in enumerate(self.config.ask):
            qid = self._question_id(event, k, final)
            with self._lock:
                self._asked[qid] = (event, stream.spec.id, final)
            try:
                stream.queue.submit(Question(qid, text, at=at, origin="frigate",
                                             meta={"frigate_event": event.id}, wait=True))
                self.counts["asked"] += 1
            except DuplicateId as error:
                if not error.same:
                    log.warning("frigate: event %s: %s", event.id, error)
            except (BadQuestion, QueueFull) as error:
                with self._lock:
                    self._asked.pop(qid, None)
                self.counts["refused"] += 1
                log.warning("frigate: event %s on %s not asked: %s", event.id, event.camera, error)

    @staticmethod
    def _question_id(event: FrigateEvent, k: int, final: bool) -> str:
        return f"frigate:{event.id}:{k}" + ("" if final else ":open")

    # --- answers out ---------------------------------------------------------------------
    def deliver(self, answer: AnswerEvent) -> None:
        with self._lock:
            asked = self._asked.pop(answer.question_id, None)
        if asked is None:
            return
        event, stream_id, final = asked
        self.counts["answered"] += 1
        message = {**event.to_dict(), "stream_id": stream_id, "question_id": answer.question_id,
                   "question": answer.question, "answer": answer.answer, "final": final,
                   "time_span": answer.time_span, "wall_time": answer.wall_time}
        self._publish(f"{self.answer_prefix}/{stream_id}/frigate/answer", message)
        if self.ha_discovery:
            self._publish(self._state_topic(stream_id, answer.question), message, retain=True)
        if final:
            with self._lock:
                answers = self._answers.setdefault(event.id, {})
                answers[answer.question] = answer.answer
                done = len(answers) == len(self.config.ask)
                if done:
                    del self._answers[event.id]
            if done:
                description = (answers[self.config.ask[0]] if len(answers) == 1
                               else " ".join(f"{q} {answers[q]}" for q in self.config.ask))
                self._publish(f"{self.config.broker.prefix}/tracked_object_update",
                              {"type": "description", "id": event.id, "description": description})

    def _publish(self, topic: str, data, retain: bool = False) -> None:
        payload = data if isinstance(data, (str, bytes)) else json_text(data)
        self.client.publish(topic, payload, qos=1, retain=retain)  # paho queues it while the broker is away

    # --- Home Assistant discovery ------------------------------------------------------
    def _state_topic(self, stream_id: str, question: str) -> str:
        return f"{self.answer_prefix}/{stream_id}/frigate/{object_id(question)}"

    def sensor_config(self, stream_id: str, question: str) -> dict:
        node = f"emloc_{safe_id(stream_id)}"
        return {
            "name": f"Frigate: {question}"[:255],
            "unique_id": f"{node}_frigate_{object_id(question)}",
            "state_topic": self._state_topic(stream_id, question),
            "value_template": "{{ value_json.answer }}",
            "json_attributes_topic": self._state_topic(stream_id, question),
            "availability_topic": self.available_topic,
            "icon": "mdi:cctv",
            "qos": 1,
            "device": {"identifiers": [node], "name": f"emloc-stream {stream_id}", "manufacturer": "emloc-stream",
                       "model": "live video stream"},
            "origin": {"name": "emloc-stream", "sw_version": "0.1.0"},
        }

    def announce(self) -> None:
        for stream_id in sorted({stream.spec.id for stream in self.streams.values()}):
            node = f"emloc_{safe_id(stream_id)}"
            for question in self.config.ask:
                topic = f"{DISCOVERY_PREFIX}/sensor/{node}/frigate_{object_id(question)}/config"
                self._publish(topic, self.sensor_config(stream_id, question), retain=True)

    # --- paho's thread -----------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        if reason.is_failure:
            log.warning("frigate: broker %s:%s refused the connection: %s", self.config.broker.host,
                        self.config.broker.port, reason)
            return
        self.connected.set()
        client.subscribe(self.events_topic, qos=1)
        self._publish(self.available_topic, "online", retain=True)
        if self.ha_discovery:
            self.announce()
        if self.ha_discovery:
            client.subscribe(f"{DISCOVERY_PREFIX}/status", qos=1)  # HA's birth message: announce again
        print(f"emloc-stream: Frigate events from {self.config.broker.host}:{self.config.broker.port} "
              f"{self.events_topic} for camera(s) {', '.join(sorted(self.streams))}", flush=True)

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == f"{DISCOVERY_PREFIX}/status":
            if message.payload == b"online":
                self.announce()
        elif message.retain:  # kept by the broker and sent at every subscription: not an event happening now
            log.warning("frigate: a retained message on %s is ignored (Frigate does not retain events)",
                        message.topic)
        else:
            self.handle(message.payload)
