"""Home Assistant MQTT discovery on a real mosquitto, checked against HA's documented discovery schema.

The fields below are those HA documents for an MQTT sensor (integrations/sensor.mqtt) and for
discovery (integrations/mqtt: discovery topic `<prefix>/<component>/[<node_id>/]<object_id>/config`,
ids of [a-zA-Z0-9_-], device and origin blocks). Templates are rendered with Jinja2, as HA does.
"""

import json
import re
import subprocess
import sys
import time

import pytest

from .broker import Broker, Client, needs_mosquitto

jinja2 = pytest.importorskip("jinja2", reason="jinja2 is not installed (pip install -e '.[test]')")
pytestmark = needs_mosquitto

SENSOR_FIELDS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "default_entity_id",
    "device", "device_class", "enabled_by_default", "encoding", "entity_category", "entity_picture",
    "expire_after", "force_update", "icon", "json_attributes_template", "json_attributes_topic",
    "last_reset_value_template", "name", "object_id", "options", "origin", "payload_available",
    "payload_not_available", "platform", "qos", "state_class", "state_topic", "suggested_display_precision",
    "unique_id", "unit_of_measurement", "value_template"}
AVAILABILITY_FIELDS = {"topic", "payload_available", "payload_not_available", "value_template"}
DEVICE_FIELDS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
                 "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device"}
ORIGIN_FIELDS = {"name", "sw_version", "support_url"}
TOPIC = re.compile(r"^homeassistant/sensor/(?:[a-zA-Z0-9_-]+/)?[a-zA-Z0-9_-]+/config$")

PUBLISHER = """
import sys, time
from sinks import AnswerEvent
from stream.config import MqttConfig
from stream.ha import HaDiscovery
from stream.questions import Question, QuestionQueue
queue = QuestionQueue()
queue.submit(Question("q1", "what digit is on screen now ?", every=1))
queue.submit(Question("q2", "is the door open ?", every=2))
queue.submit(Question("q3", "what colour was the triangle ?"))  # one-off: no entity
ha = HaDiscovery(MqttConfig(port=int(sys.argv[1]), backoff=(0.1, 0.5)), "front door", queue).start()
assert ha.connected.wait(10)
ha.deliver(AnswerEvent("front door", "q1", "what digit is on screen now ?", "seven", (0.0, 7.5), time.time(), 30, 0.02))
ha.deliver(AnswerEvent("front door", "q3", "what colour was the triangle ?", "red", (0.0, 7.5), time.time(), 30, 0.02))
print("ready", flush=True)
sys.stdin.readline()
queue.cancel("q2")
ha.sync()
print("withdrawn", flush=True)
time.sleep(60)
"""


def render(template: str, payload) -> str:
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload)).strip()


def wait_for(condition, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_standing_questions_become_ha_sensors_with_availability_by_last_will(tmp_path):
    broker = Broker(tmp_path).start()
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(broker.port)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    watcher = None
    try:
        assert publisher.stdout.readline().strip() == "ready"
        # a client that subscribes afterwards gets the configs: they are retained, as HA needs after a restart
        watcher = Client(broker.port, ["homeassistant/#", "emloc/front door/#"], name="ha-watcher")
        configs = lambda: {t: m for t, m in watcher.messages.items() if t.startswith("homeassistant/")}  # noqa: E731
        assert wait_for(lambda: len(configs()) == 2), watcher.messages
        entities = {}
        for topic, [config] in configs().items():
            assert TOPIC.match(topic), topic
            assert set(config) <= SENSOR_FIELDS, set(config) - SENSOR_FIELDS
            assert config["state_topic"] and config["unique_id"] and config["name"]
            assert set(config["device"]) <= DEVICE_FIELDS and config["device"]["identifiers"]
            assert set(config["origin"]) <= ORIGIN_FIELDS and config["origin"]["name"]
            for item in config["availability"]:
                assert set(item) <= AVAILABILITY_FIELDS and item["topic"] == "emloc/front door/status"
            entities[config["name"]] = (topic, config)
        assert set(entities) == {"what digit is on screen now ?", "is the door open ?"}, "standing ones only"
        assert len({c["unique_id"] for _, c in entities.values()}) == 2
        topic, digit = entities["what digit is on screen now ?"]
        assert "/emloc_front_door/" in topic, "the stream id is made safe for a topic"
        # retained too; it may reach a new subscriber after the configs (each topic's retained message comes
        # on its own), so wait for it as for the configs
        assert wait_for(lambda: watcher.got(digit["state_topic"])), watcher.messages
        [state] = watcher.got(digit["state_topic"])
        state = json.dumps(state)
        assert render(digit["value_template"], state) == "seven"
        assert json.loads(state)["question_id"] == "q1"  # attributes (json_attributes_topic) say which question
        availability = digit["availability"][0]["value_template"]
        status = lambda: watcher.got("emloc/front door/status")  # noqa: E731
        assert wait_for(lambda: status()) and render(availability, json.dumps(status()[-1])) == "online"
        bridge_status = {"stream_id": "front door", "state": "running", "frames_seen": 3}
        assert render(availability, json.dumps(bridge_status)) == "online"
        assert render(availability, json.dumps(dict(bridge_status, state="reconnecting"))) == "offline"
        publisher.stdin.write("withdraw\n")
        publisher.stdin.flush()
        assert publisher.stdout.readline().strip() == "withdrawn"
        door_topic = entities["is the door open ?"][0]
        assert wait_for(lambda: watcher.got(door_topic)[-1:] == [b""]), "an empty config removes the entity"
        publisher.kill()  # dies without a word: the broker sends its last will
        assert wait_for(lambda: status()[-1].get("state") == "offline"), status()
        assert render(availability, json.dumps(status()[-1])) == "offline"
    finally:
        publisher.kill()
        if watcher:
            watcher.close()
        broker.stop()
