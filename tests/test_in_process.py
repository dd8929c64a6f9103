"""Modules that the other tests reach only in a process of their own (the program's entry, Home Assistant
discovery, questions typed on stdin) or only on a Ray cluster (the batch driver's retries), run here in the
test process, in a second or two each, so the fast tier (`pytest -m "not slow"`) exercises them too
(tests/check_coverage.py)."""

import runpy
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from sinks import AnswerEvent
from stream.config import MqttConfig
from stream.questions import Question, QuestionQueue
from stream.stdin_questions import read_stdin_questions

from .broker import Broker, Client, needs_mosquitto


def test_python_dash_m_stream_is_the_program(monkeypatch, capsys):
    """stream/__main__.py: `python -m stream --help` lists the commands and exits 0 (signal handlers put back)."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", ["emloc-stream", "--help"])
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_module("stream", run_name="__main__")
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "run", "batch", "live", "serve"):
        assert command in out


def test_stdin_questions_are_asked_and_a_refused_one_is_named(capsys):
    queue = QuestionQueue()
    read_stdin_questions(queue, ["what digit is on screen now ?\n", "   \n", "x" * 100_000 + "\n",
                                 "what colour was the square ?\n"]).join(10)
    asked = queue.snapshot()
    assert [q["question"] for q in asked] == ["what digit is on screen now ?", "what colour was the square ?"]
    assert len(set(queue.ids())) == 2
    err = capsys.readouterr().err
    assert err.startswith("question refused: ") and len(err.strip().splitlines()) == 1


@needs_mosquitto
def test_ha_discovery_announces_a_standing_question_and_its_answer(tmp_path):
    from stream.ha import HaDiscovery, object_id

    broker = Broker(tmp_path).start()
    watcher = Client(broker.port, ["homeassistant/#", "emloc/#"], name="ha-in-process")
    # subscribed before the announcement: a retained message published while the subscription is being set up
    # can reach the subscriber twice (live and retained), and this test counts announcements
    assert watcher.subscribed.wait(10)
    queue = QuestionQueue()
    question = "what digit is on screen now ?"
    queue.submit(Question("q1", question, every=1))
    queue.submit(Question("q2", "what colour was the triangle ?"))  # one-off: no entity
    ha = HaDiscovery(MqttConfig(port=broker.port, backoff=(0.1, 0.5)), "front door", queue).start()
    obj = object_id(question)
    config_topic = f"homeassistant/sensor/emloc_front_door/{obj}/config"
    state_topic = f"emloc/front door/standing/{obj}"
    try:
        assert ha.connected.wait(10)
        ha.deliver(AnswerEvent("front door", "q1", question, "seven", (0.0, 7.5), time.time(), 30, 0.02))
        deadline = time.time() + 10
        while not (watcher.got(config_topic) and watcher.got(state_topic)) and time.time() < deadline:
            time.sleep(0.05)
        [config] = watcher.got(config_topic)
        assert config == ha.sensor_config(question) and config["state_topic"] == state_topic
        assert watcher.got(state_topic)[-1]["answer"] == "seven"
        assert [t for t in watcher.messages if t.startswith("homeassistant/")] == [config_topic]
    finally:
        ha.close()
        watcher.close()
        broker.stop()
    assert watcher.got("emloc/front door/status")[-1]["state"] == "offline"


def test_a_ray_batch_retries_a_failed_video_then_gives_up_naming_why(capsys):
    pytest.importorskip("ray")
    from collections import Counter, deque

    from stream.distributed.batch import _retry, _short
    from stream.distributed.cluster import actor_options, node_label
    from stream.job import VideoJob

    job = VideoJob(Path("a.mp4"), "a.mp4", [Question("q1", "what digit is on screen now ?")])
    todo, attempts, failed = deque(), Counter(), []
    assert _retry(todo, attempts, failed, job, 1, "node died") == 1 and list(todo) == [job] and not failed
    todo.clear()
    assert _retry(todo, attempts, failed, job, 1, "node died again") == 0 and not todo
    assert failed == [(Path("a.mp4"), "2 attempts failed, the last: node died again")]
    err = capsys.readouterr().err.splitlines()
    assert err == ["a.mp4: attempt 1 failed: node died; retrying",
                   "a.mp4: failed after 2 attempts: node died again"]
    assert _short(RuntimeError("first line\n  second line")) == "first line"
    where = dict(node_id="0123456789abcdef", node_ip="10.0.0.2", pid=42)
    assert node_label(where) == "node 01234567 (10.0.0.2), pid 42"

    class Args:
        cpus_per_worker, gpus_per_worker, resources = 2, 0, [("camera", 1)]

    assert actor_options(Args(), max_restarts=3) == dict(num_cpus=2, num_gpus=0, resources={"camera": 1},
                                                         max_restarts=3)


def test_threads_left_running_are_daemons():
    """The stdin reader must never keep the program alive: it is a daemon thread."""
    queue = QuestionQueue()
    gate = threading.Event()

    def lines():
        gate.wait(5)
        yield "is anyone there ?\n"

    thread = read_stdin_questions(queue, lines())
    assert thread.daemon and thread.is_alive()
    gate.set()
    thread.join(5)
    assert [q["question"] for q in queue.snapshot()] == ["is anyone there ?"]
