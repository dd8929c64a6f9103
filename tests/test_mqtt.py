"""MQTT-triggered questions against a real mosquitto broker."""

import itertools
import time

import pytest

from emloc import EMLoCSettings, StreamContext
from stream.config import MqttConfig
from stream.mqtt import MqttBridge
from stream.questions import QuestionQueue
from stream.runtime import StreamRunner
from stream.sources import Frame

from .broker import Broker, Client, needs_mosquitto
from .reference import random_frames

pytestmark = needs_mosquitto
SETTINGS = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.5, 1.0), chunk_frames=8)
MALFORMED = [
    (b"not json at all", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"id": "x1"}', "missing field 'question'"),
    (b'{"id": "x2", "question": 7}', "'question' must be a string"),
    (b'{"id": "x3", "question": "what ?", "at": "soon"}', "'at'"),
    (b'{"id": "x4", "question": "what ?", "every": 0}', "'every'"),
    (b'{"id": "x5", "question": "what ?", "colour": "red"}', "unknown field"),
    (b'{"id": [1], "question": "what ?"}', "'id' must be"),
    (b'{"id": "x7", "question": "' + b"a" * 9000 + b'"}', "exceeds the limit"),
]


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()


def wait_for(condition, timeout=30.0, step=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if step:
            step()
        else:
            time.sleep(0.05)
    return False


class Stream:
    """A runner fed synthetic frames on demand, with its MQTT bridge."""

    def __init__(self, model, tokenizer, port):
        self.queue = QuestionQueue(max_waiting=8)
        self.bridge = MqttBridge(MqttConfig(port=port, backoff=(0.1, 0.5)), "cam", self.queue).start()
        context = StreamContext(model, tokenizer, SETTINGS)
        self.runner = StreamRunner("cam", context, self.queue, [self.bridge], max_new_tokens=2,
                                   on_error=lambda qid, msg: self.bridge.publish_error(msg, qid))
        images = random_frames(16, seed=3)
        self.frames = (Frame(images[i % 16], i / 2) for i in itertools.count())

    def step(self):
        self.runner.feed(next(self.frames))
        time.sleep(0.01)


def test_questions_answered_and_malformed_payloads_reported(broker, qwen2_vl, tokenizer):
    client = Client(broker.port, ["emloc/cam/answer", "emloc/cam/error", "emloc/cam/status"])
    stream = Stream(qwen2_vl, tokenizer, broker.port)
    try:
        assert stream.bridge.subscribed.wait(10)
        for payload, _ in MALFORMED:
            client.publish("emloc/cam/ask", payload)
        client.publish("emloc/cam/ask", {"id": "good", "question": "what colour was the square ?"})
        assert wait_for(lambda: client.got("emloc/cam/answer"), step=stream.step)
        errors = client.got("emloc/cam/error")
        assert wait_for(lambda: len(client.got("emloc/cam/error")) == len(MALFORMED))
        errors = client.got("emloc/cam/error")
        for (_, expected), error in zip(MALFORMED, errors):
            assert expected in error["error"], (expected, error)
        assert [e["id"] for e in errors[3:5]] == ["x1", "x2"]
        answer = client.got("emloc/cam/answer")[0]
        assert answer["question_id"] == "good" and answer["stream_id"] == "cam" and answer["cache_tokens"] > 0
        stream.bridge.publish_status(stream.runner.status.to_dict())
        assert wait_for(lambda: client.got("emloc/cam/status"))
        assert client.got("emloc/cam/status")[-1]["frames_seen"] == stream.runner.status.frames_seen
    finally:
        stream.bridge.close()
        client.close()


def test_answer_and_status_times_are_rounded_to_the_millisecond(broker):
    from sinks import AnswerEvent

    client = Client(broker.port, ["emloc/cam/answer", "emloc/cam/status"])
    bridge = MqttBridge(MqttConfig(port=broker.port, backoff=(0.1, 0.5)), "cam", QuestionQueue(max_waiting=8)).start()
    try:
        assert bridge.subscribed.wait(10)
        bridge.deliver(AnswerEvent("cam", "q1", "what ?", "five", (0.1 + 0.2, 48.50000000000001), 1733390000.1234567,
                                   160, 0.30000000000000004))
        bridge.publish_status(dict(stream_id="cam", stream_time=12.000000000000002, temporal_scale=0.0625))
        assert wait_for(lambda: client.got("emloc/cam/answer") and client.got("emloc/cam/status"))
        answer, status = client.got("emloc/cam/answer")[0], client.got("emloc/cam/status")[0]
        assert answer["time_span"] == [0.3, 48.5] and answer["latency_s"] == 0.3
        assert answer["wall_time"] == 1733390000.123
        assert status["stream_time"] == 12.0 and status["temporal_scale"] == 0.0625
    finally:
        bridge.close()
        client.close()


def test_broker_restart_loses_no_accepted_question(broker, qwen2_vl, tokenizer):
    client = Client(broker.port, ["emloc/cam/answer"], name="restart-client")
    stream = Stream(qwen2_vl, tokenizer, broker.port)
    try:
        assert stream.bridge.subscribed.wait(10)
        client.publish("emloc/cam/ask", {"id": "before", "question": "what digit is on screen now ?", "at": 6})
        assert wait_for(lambda: stream.queue.waiting() == 1)  # accepted, due once the stream reaches 6 s
        broker.stop()
        assert wait_for(lambda: not stream.bridge.connected.is_set())
        assert wait_for(lambda: stream.runner.status.answers == 1, step=stream.step)  # answered while down
        assert stream.bridge.pending() >= 1
        broker.start()
        assert stream.bridge.subscribed.wait(15) and stream.bridge.connects == 2
        client.publish("emloc/cam/ask", {"id": "after", "question": "what colour was the star ?"})
        ids = lambda: [a["question_id"] for a in client.got("emloc/cam/answer")]  # noqa: E731
        assert wait_for(lambda: set(ids()) == {"before", "after"}, step=stream.step), ids()
        assert sorted(ids()) == ["after", "before"], "each answered exactly once"
    finally:
        stream.bridge.close()
        client.close()


@pytest.mark.slow
def test_password_and_tls(tmp_path, qwen2_vl, tokenizer):
    """A broker that wants a password over TLS: the right ones are answered, a wrong password is refused."""
    import shutil
    import subprocess

    if not (shutil.which("openssl") and shutil.which("mosquitto_passwd")):
        pytest.skip("openssl and mosquitto_passwd are needed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "cam", "s3cret"], check=True, capture_output=True)
    broker = Broker(tmp_path, anonymous=False, extra=f"password_file {passwords}\ncertfile {cert}\nkeyfile {key}\n")
    broker.start()
    queue = QuestionQueue()
    good = MqttBridge(MqttConfig(port=broker.port, username="cam", password="s3cret", ca_file=str(cert),
                                 backoff=(0.1, 0.5)), "cam", queue).start()
    bad = MqttBridge(MqttConfig(port=broker.port, username="cam", password="wrong", ca_file=str(cert),
                                backoff=(0.1, 0.5)), "other", QuestionQueue()).start()
    try:
        assert good.subscribed.wait(10), good.last_error
        assert wait_for(lambda: bad.last_error != "", timeout=10) and not bad.connected.is_set()
        context = StreamContext(qwen2_vl, tokenizer, SETTINGS)
        runner = StreamRunner("cam", context, queue, [good], max_new_tokens=2)
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-test")
        client.username_pw_set("cam", "s3cret")
        client.tls_set(ca_certs=str(cert))
        got = []
        client.on_message = lambda c, u, m: got.append(m.payload)
        client.on_connect = lambda c, *_: c.subscribe("emloc/cam/answer", qos=1)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        assert wait_for(client.is_connected, timeout=10)
        time.sleep(0.3)
        client.publish("emloc/cam/ask", '{"id": "t1", "question": "what ?"}', qos=1).wait_for_publish(10)
        frames = iter(Frame(f, i / 2) for i, f in enumerate(random_frames(64, seed=5)))
        assert wait_for(lambda: got, step=lambda: runner.feed(next(frames)))
        assert b'"question_id": "t1"' in got[0]
        client.loop_stop()
    finally:
        good.close()
        bad.close(timeout=1)
        broker.stop()
