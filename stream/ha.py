"""Home Assistant MQTT discovery (`--ha-discovery`): a stream's standing questions appear in Home
Assistant as sensors whose state is the newest answer.

Following HA's discovery conventions, each standing question gets a retained config on
`homeassistant/sensor/<node>/<object>/config` (an empty retained config removes the entity when
the question is withdrawn); its answers go, retained, to `<prefix>/<stream>/standing/<object>`.
Availability is read from the stream's status topic, on which this client's last will (retained)
says `offline` if the process dies; the bridge's status messages say `running` again. Object ids
come from a digest of the question text, so an entity survives restarts.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import threading

from sinks import AnswerEvent, Sink, json_text

from .config import MqttConfig
from .questions import QuestionQueue

log = logging.getLogger("emloc_stream")
DISCOVERY_PREFIX = "homeassistant"
ONLINE_STATES = ("starting", "running")
AVAILABILITY = ("{{ 'online' if value_json.state in ('" + "', '".join(ONLINE_STATES) + "') else 'offline' }}")


def safe_id(text: str) -> str:
    """An id HA accepts in topics and unique ids: [a-zA-Z0-9_-]."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text)[:64] or "_"


def object_id(question: str) -> str:
    return "q_" + hashlib.sha256(question.encode()).hexdigest()[:10]


class HaDiscovery(Sink):
    def __init__(self, broker: MqttConfig, stream_id: str, queue: QuestionQueue,
                 discovery_prefix: str = DISCOVERY_PREFIX) -> None:
        import paho.mqtt.client as mqtt

        self.broker, self.stream_id, self.queue = broker, stream_id, queue
        self.node = f"emloc_{safe_id(stream_id)}"
        self.discovery_prefix = discovery_prefix
        self.status_topic = f"{broker.prefix}/{stream_id}/status"
        self.announced: dict[str, str] = {}  # object id -> question text
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"emloc-stream-ha-{stream_id}")
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self.client.tls_set_context(ssl.create_default_context(cafile=broker.ca_file))
        self.client.will_set(self.status_topic, self._status("offline"), qos=1, retain=True)
        self.client.reconnect_delay_set(*[max(1, round(b)) for b in broker.backoff])
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.on_message = self._on_message

    def start(self) -> HaDiscovery:
        self.client.connect_async(self.broker.host, self.broker.port)
        self.client.loop_start()
        return self

    # --- discovery ---------------------------------------------------------------------
    def config_topic(self, obj: str) -> str:
        return f"{self.discovery_prefix}/sensor/{self.node}/{obj}/config"

    def state_topic(self, obj: str) -> str:
        return f"{self.broker.prefix}/{self.stream_id}/standing/{obj}"

    def sensor_config(self, question: str) -> dict:
        obj = object_id(question)
        return {
            "name": question[:255],
            "unique_id": f"{self.node}_{obj}",
            "state_topic": self.state_topic(obj),
            "value_template": "{{ value_json.answer }}",
            "json_attributes_topic": self.state_topic(obj),
            "availability": [{"topic": self.status_topic, "value_template": AVAILABILITY}],
            "availability_mode": "all",
            "icon": "mdi:cctv",
            "qos": 1,
            "device": {"identifiers": [self.node], "name": f"emloc-stream {self.stream_id}",
                       "manufacturer": "emloc-stream", "model": "live video stream"},
            "origin": {"name": "emloc-stream", "sw_version": "0.1.0"},
        }

    def sync(self) -> None:
        """Announces new standing questions and removes withdrawn ones."""
        with self._lock:
            self._sync_locked()

    def _sync_locked(self, again: bool = False) -> None:
        """sync's work, the lock held; again: announce every standing question anew (a new connection, HA's
        birth), in the same hold, so that an answer delivered meanwhile does not announce it a second time."""
        if again:
            self.announced = {}
        standing = {object_id(q["question"]): q["question"] for q in self.queue.snapshot() if q["every"]}
        for obj, text in standing.items():
            if obj not in self.announced:
                self._publish(self.config_topic(obj), json_text(self.sensor_config(text)), retain=True)
        for obj in set(self.announced) - set(standing):
            self._publish(self.config_topic(obj), b"", retain=True)  # HA removes the entity
        self.announced = standing

    def deliver(self, event: AnswerEvent) -> None:
        self.sync()
        obj = object_id(event.question)
        if obj in self.announced:
            state = {"answer": event.answer[:255], "question": event.question, "question_id": event.question_id,
                     "time_span": event.time_span, "wall_time": event.wall_time}
            self._publish(self.state_topic(obj), json_text(state), retain=True)

    def close(self) -> None:
        """Says `offline` (retained) while the broker is there, then disconnects; never raises."""
        try:
            if self.connected.is_set():
                self._publish(self.status_topic, self._status("offline"), retain=True).wait_for_publish(5)
        except (RuntimeError, ValueError) as error:
            log.warning("ha: could not say offline: %s", error)
        self.client.disconnect()
        self.client.loop_stop()

    # --- paho's thread -----------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        if reason.is_failure:
            log.warning("ha: broker refused the connection: %s", reason)
            return
        client.subscribe(f"{self.discovery_prefix}/status", qos=1)  # HA's birth message: announce again
        self._publish(self.status_topic, self._status("starting"), retain=True)
        with self._lock:
            self._sync_locked(again=True)
        self.connected.set()  # after the announcements: whoever waits for it delivers answers to announced sensors

    def _on_message(self, client, userdata, message) -> None:
        if message.payload == b"online":
            with self._lock:
                self._sync_locked(again=True)

    def _publish(self, topic: str, payload, retain: bool = False):
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def _status(self, state: str) -> str:
        return json_text({"stream_id": self.stream_id, "state": state})


def announce(streams: list, broker: MqttConfig) -> None:
    """`--ha-discovery`: each stream's standing questions become Home Assistant sensors, kept in step
    with the stream (a `HaDiscovery` subscribed to it)."""
    for stream in streams:
        stream.subscribe(HaDiscovery(broker, stream.spec.id, stream.queue).start())
