"""The Frigate bridge: recorded `frigate/events` payloads (the layout of Frigate's MQTT documentation) on a real
mosquitto, over a synthetic video that ffmpeg streams in real time into `live --frigate`.

Frigate's times are wall-clock, so the video is streamed at its own pace (-re, 48 s) and each event is published
when Frigate would publish it (after its end). Every answer is checked against the digit on screen at the end of
its event (the ground truth of "what digit is on screen now ?"), and its time span against the event's end.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from argparse import Namespace

import pytest

from stream.config import ConfigError
from stream.frigate import BadEvent, FrigateConfig, config_from, parse_event
from stream.ha import object_id
from stream.sources import write_video
from stream.suites.synthetic import make_video

from .broker import Broker, Client, free_port, needs_mosquitto
from .test_end_to_end import cli, digit_at, padded, popen, udp_bound, until

QUESTION = "what digit is on screen now ?"
SEED = 9_300_004  # digits 2 [0, 7) s, 7 [7, 15), 8 [15, 30), 4 [30, 39), 7 [39, 48): events end >= 4 s from a change


def frigate_event(kind: str, event_id: str, camera: str, label: str, start: float, end: float | None) -> dict:
    """A `frigate/events` message as Frigate publishes it (docs/docs/integrations/mqtt.md), times replaced."""
    state = {"id": event_id, "camera": camera, "frame_time": end or start,
             "snapshot": {"frame_time": start + 0.5, "box": [15, 18, 40, 52], "area": 850, "region": [0, 0, 56, 56],
                          "score": 0.77546, "attributes": []},
             "label": label, "sub_label": None, "top_score": 0.958984375, "false_positive": False,
             "start_time": start, "end_time": end, "score": 0.7890625, "box": [16, 18, 40, 52], "area": 864,
             "ratio": 0.705882, "region": [0, 0, 56, 56], "current_zones": ["driveway"],
             "entered_zones": ["yard", "driveway"], "thumbnail": None, "has_snapshot": False, "has_clip": False,
             "active": True, "stationary": False, "motionless_count": 0, "position_changes": 2,
             "attributes": {"face": 0.64}, "current_attributes": [], "current_estimated_speed": 0.71,
             "average_estimated_speed": 14.3, "velocity_angle": 180}
    return {"type": kind, "before": {**state, "end_time": None}, "after": state}


def test_recorded_payloads_are_read_and_bad_ones_named():
    event = parse_event(json.dumps(frigate_event("end", "1607123955.475377-mxklsc", "front_door", "person",
                                                 1607123955.475377, 1607123961.8)).encode(), 65536)
    assert (event.type, event.id, event.camera, event.label) == ("end", "1607123955.475377-mxklsc", "front_door",
                                                                 "person")
    assert (event.start_time, event.end_time) == (1607123955.475377, 1607123961.8)
    good = frigate_event("new", "e1", "cam", "car", 1e9, None)
    bad = {
        b"{broken": "not JSON",
        b"[1, 2]": "an event must be a JSON object",
        json.dumps({**good, "type": "delete"}).encode(): "unknown event type 'delete'",
        json.dumps({"type": "new"}).encode(): "no 'after' object",
        json.dumps({**good, "after": {**good["after"], "start_time": "noon"}}).encode(): "after.start_time",
        json.dumps({**good, "after": {**good["after"], "camera": ""}}).encode(): "after.camera",
        json.dumps({**good, "after": {**good["after"], "id": "x\n"}}).encode(): "after.id",
        json.dumps({**good, "type": "end"}).encode(): "'end' event without after.end_time",
        json.dumps({**good, "after": {**good["after"], "end_time": 1.0}}).encode(): "not before start_time",
        b"x" * 70000: "exceeds the limit",
    }
    for payload, message in bad.items():
        with pytest.raises(BadEvent, match=message):
            parse_event(payload, 65536)


def test_config_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="give the questions"):
        FrigateConfig.from_dict({"host": "127.0.0.1"})
    with pytest.raises(ConfigError, match="unknown key"):
        FrigateConfig.from_dict({"ask": ["q"], "camera": "x"})
    with pytest.raises(ConfigError, match=r"frigate\.port"):
        FrigateConfig.from_dict({"ask": ["q"], "port": 0})
    config = FrigateConfig.from_dict({"ask": ["q"], "cameras": {"front_door": "gate"}, "labels": ["person"]})
    assert config.broker.prefix == "frigate" and config.watched(["gate", "yard"]) == {"front_door": "gate"}
    with pytest.raises(ConfigError, match=r"stream\(s\) \['gate'\] that are not served"):
        config.watched(["yard"])
    for option, value in (("frigate_ask", ["q"]), ("frigate_camera", "front_door"), ("frigate_label", ["car"])):
        with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')} needs --frigate"):
            config_from(Namespace(frigate=None, **{option: value}), None, ["cam"])
    args = Namespace(frigate="127.0.0.1:1883", frigate_ask=["q"], frigate_camera=None, frigate_label=None,
                     frigate_prefix="nvr", stream_id="gate", mqtt_user=None, mqtt_password=None, mqtt_tls=False,
                     mqtt_ca=None)
    config = config_from(args, None, ["gate"])
    assert config.cameras == {"gate": "gate"} and config.broker.prefix == "nvr" and config.ask == ("q",)


def stream_realtime(path, port: int) -> subprocess.Popen:
    until(lambda: udp_bound(port), 300, f"the stream to listen on UDP port {port}")
    return subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-i", str(path), "-c:v", "copy", "-f", "mpegts",
                             f"udp://127.0.0.1:{port}?pkt_size=1316"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (apt install ffmpeg)")
@needs_mosquitto
def test_frigate_events_are_answered_over_their_span(tmp_path):
    video = make_video(SEED, frames=96)
    source = padded(video, write_video(tmp_path / "driveway.mp4", video.frames, video.fps))
    broker = Broker(tmp_path).start()
    client = Client(broker.port, ["emloc/driveway/frigate/answer", "frigate/tracked_object_update",
                                  "homeassistant/sensor/#", "emloc/frigate/available", "emloc/driveway/answer",
                                  "emloc/driveway/status"], name="frigate-test")
    port = free_port(socket.SOCK_DGRAM)
    live = popen("live", f"udp://127.0.0.1:{port}", "--stream-id", "driveway", "--mqtt", f"127.0.0.1:{broker.port}",
                 "--frigate", f"127.0.0.1:{broker.port}", "--frigate-ask", QUESTION, "--frigate-label", "car",
                 "--frigate-label", "person", "--ha-discovery", "--buffer", "256", "--status-every", "0.5",
                 "--max-new-tokens", "2")
    ffmpeg = None
    # (id, label, start, end) in stream seconds; e2 is first seen at its end, e3 gets an update in between
    events = [("1700000001.1-aaaaaa", "car", 7.5, 11.0), ("1700000002.2-bbbbbb", "person", 17.0, 22.0),
              ("1700000003.3-cccccc", "car", 30.5, 34.0)]
    try:
        until(lambda: b"online" in client.got("emloc/frigate/available"), 120, "the bridge to connect")
        ffmpeg = stream_realtime(source, port)
        t0 = time.time()  # the wall-clock time of the video's first frame, give or take the start of ffmpeg

        def publish_at(stream_time: float, message) -> None:
            time.sleep(max(0.0, t0 + stream_time - time.time()))
            client.publish("frigate/events", message)

        (e1, _, s1, x1), (e2, _, s2, x2), (e3, _, s3, x3) = events
        publish_at(s1, frigate_event("new", e1, "driveway", "car", t0 + s1, None))
        publish_at(x1 + 1, frigate_event("end", e1, "driveway", "car", t0 + s1, t0 + x1))
        client.publish("frigate/events", b"{broken")
        client.publish("frigate/events", {**frigate_event("new", "e9", "driveway", "car", t0, None), "type": "delete"})
        client.publish("frigate/events", frigate_event("end", "e8", "back_yard", "car", t0 + 1, t0 + 5))
        client.publish("frigate/events", frigate_event("end", "e7", "driveway", "dog", t0 + 1, t0 + 5))
        publish_at(x2 + 1, frigate_event("end", e2, "driveway", "person", t0 + s2, t0 + x2))
        publish_at(s3, frigate_event("new", e3, "driveway", "car", t0 + s3, None))
        publish_at(s3 + 1, frigate_event("update", e3, "driveway", "car", t0 + s3, None))
        publish_at(x3 + 1, frigate_event("end", e3, "driveway", "car", t0 + s3, t0 + x3))
        until(lambda: len(client.got("frigate/tracked_object_update")) >= 3, 300, "three event descriptions")
        time.sleep(1.0)
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=300)
        assert live.returncode == 0, err
    finally:
        for process in (ffmpeg, live):
            if process is not None and process.poll() is None:
                process.kill()
        client.close()
        broker.stop()
    answers = client.got("emloc/driveway/frigate/answer")
    assert sorted(a["event_id"] for a in answers) == sorted(e[0] for e in events), answers
    assert all(a["final"] and a["question"] == QUESTION and a["camera"] == "driveway" for a in answers)
    right = 0
    for event_id, label, start, end in events:
        answer = next(a for a in answers if a["event_id"] == event_id)
        assert answer["label"] == label and answer["end_time"] - answer["start_time"] == pytest.approx(end - start)
        span_end = answer["time_span"][1]
        # answered at the event's end, less the start of ffmpeg (t0 is taken before it reads the first frame)
        assert end - 2.5 <= span_end <= end + 1.0, (event_id, answer["time_span"], end)
        truth = digit_at(video, span_end)
        assert truth == digit_at(video, end), "the events end >= 4 s from a digit change"
        right += answer["answer"].strip() == truth
        print(f"\n{event_id} ({label}, ends at {end} s): {answer['answer']!r}, expected {truth!r}")
    assert right >= 2, f"{right}/3 right: {answers}"
    descriptions = client.got("frigate/tracked_object_update")
    assert sorted(d["id"] for d in descriptions) == sorted(e[0] for e in events)
    assert all(d["type"] == "description" and d["description"] for d in descriptions)
    # the event questions reach the stream's other sinks too, and nothing else was asked
    assert sorted(a["question_id"] for a in client.got("emloc/driveway/answer")) == sorted(
        f"frigate:{e[0]}:0" for e in events)
    sensor = f"homeassistant/sensor/emloc_driveway/frigate_{object_id(QUESTION)}/config"
    config = client.got(sensor)[0]
    assert config["state_topic"] == f"emloc/driveway/frigate/{object_id(QUESTION)}"
    assert config["availability_topic"] == "emloc/frigate/available"
    assert client.got("emloc/frigate/available")[-1] == b"offline"  # said on the way out
    for line in ("event ignored: not JSON", "event ignored: unknown event type 'delete'",
                 "events from camera 'back_yard' are ignored: not watched (watched: driveway)",
                 "event e7 (dog on driveway) ignored: label not in ['car', 'person']"):
        assert line in err, err


def test_serve_names_a_bad_frigate_section_before_the_model_loads(tmp_path):
    config = tmp_path / "site.yaml"  # the section's own checks: test_config_is_checked_before_anything_runs
    config.write_text("streams:\n  - id: gate\n    source: udp://127.0.0.1:9\nfrigate:\n  ask: [q]\n  topic: x\n")
    result = cli("serve", "--config", str(config), "--model", str(tmp_path / "no-model"), timeout=120)
    assert result.returncode != 0 and "unknown key(s) ['topic'] in frigate" in result.stderr, result.stderr
    assert "no-model" not in result.stderr, "the section is checked first"
