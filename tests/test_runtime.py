"""The stream runtime: question queue, runner, JSON Lines sink, and a resumable batch."""

import json
import os
import signal
import subprocess
import time

import pytest

from emloc import EMLoCSettings, StreamContext
from sinks import AnswerEvent, JsonLinesSink, Sink, read_answers
from stream.questions import BadQuestion, Question, QuestionQueue, QueueFull
from stream.runtime import StreamRunner
from stream.sources import Frame, write_video
from stream.suites.synthetic import make_video

from .reference import random_frames
from .test_cli import console_script

SETTINGS = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.5, 1.0), chunk_frames=8)


class Collect(Sink):
    def __init__(self):
        self.events = []

    def deliver(self, event):
        self.events.append(event)


class Broken(Sink):
    def deliver(self, event):
        raise OSError("disk full")


def frames(n, fps=2.0, seed=0):
    return [Frame(image, i / fps) for i, image in enumerate(random_frames(n, seed=seed))]


def test_queue_is_bounded_and_refuses_clearly():
    queue = QuestionQueue(max_waiting=2)
    queue.submit(Question("a", "what ?"))
    queue.submit(Question("b", "what ?"))
    with pytest.raises(QueueFull, match="'c' was not accepted"):
        queue.submit(Question("c", "what ?"))
    queue.submit(Question("s", "is anyone at the door ?", every=3))  # standing ones do not wait
    assert [q.id for q in queue.take_due(None, 0, False)] == ["a", "b"]
    for bad, message in [(dict(text=""), "non-empty"), (dict(text="x", at=-1), "'at'"),
                         (dict(text="x", every=0), "'every'"), (dict(text="x" * 3000), "limit"),
                         (dict(text="x", at=1, every=2), "not both")]:
        with pytest.raises(BadQuestion, match=message):
            Question("bad", **bad)


def test_one_at_a_time_the_queue_serves_askers_in_turn():
    queue = QuestionQueue(max_waiting=16)
    for i in range(6):
        queue.submit(Question(f"flood{i}", "what ?", meta={"client": "10.0.0.9"}))
    queue.submit(Question("other", "what ?", meta={"client": "10.0.0.7"}))
    queue.submit(Question("cli", "what ?"))  # no client: its transport is the asker
    taken = [queue.take_due(None, 0, False, limit=1)[0].id for _ in range(5)]
    assert taken == ["flood0", "other", "cli", "flood1", "flood2"]


def test_runner_answers_one_off_scheduled_and_standing(qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS)
    queue, sink = QuestionQueue(), Collect()
    runner = StreamRunner("cam", context, queue, [Broken(), sink], max_new_tokens=2)
    queue.submit(Question("later", "what digit is on screen now ?", at=6.0))
    queue.submit(Question("door", "is anyone at the door ?", every=2))
    video = frames(36)
    for i, frame in enumerate(video):
        if i == 11:  # mid-chunk: answered now, over the cache plus the 3 frames not yet folded
            queue.submit(Question("now", "what colour was the square ?"))
        runner.feed(frame)
    runner.finish()
    by_id = {}
    for event in sink.events:
        by_id.setdefault(event.question_id, []).append(event)
    assert by_id["now"][0].time_span == (0.0, 5.5), "the partial chunk's frames were seen"
    assert by_id["later"][0].time_span[1] >= 6.0 and len(by_id["later"]) == 1
    assert len(by_id["door"]) == 2, "standing question re-answered after chunks 2 and 4"
    assert runner.status.chunks_folded == 5 and runner.status.state == "ended"
    assert runner.status.answers == len(sink.events) == 4
    assert runner.status.temporal_scale == 1.0


class Timeline(Sink):
    """What the runner did, in order: 'fold' or the question id answered."""

    def __init__(self, events):
        self.events = events

    def deliver(self, event):
        self.events.append(event.question_id)
        self.spans = {**getattr(self, "spans", {}), event.question_id: event.time_span}


def test_folding_keeps_its_share_under_a_full_queue(qwen2_vl, tokenizer):
    # frames always waiting (a live source behind): at most 2 one-off answers between two folds, the rest wait
    # in the queue (still cancellable); caught up, the queue is emptied one question at a time
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS)
    queue, timeline, behind = QuestionQueue(max_waiting=64), [], [True]
    sink = Timeline(timeline)
    runner = StreamRunner("cam", context, queue, [sink], max_new_tokens=1,
                          on_fold=lambda r: timeline.append("fold"), behind=lambda: behind[0], answers_per_fold=2)
    for i in range(30):
        queue.submit(Question(f"q{i}", "what digit is on screen now ?"))
    queue.submit(Question("door", "is anyone at the door ?", every=1))
    queue.submit(Question("at5", "what colour was the square ?", at=5.0))  # answered at 5.0 s, share or not
    for frame in frames(24):
        runner.feed(frame)
    assert sink.spans["at5"] == (0.0, 5.0), "a scheduled question is answered over the video up to its time"
    assert timeline.count("fold") == 3, timeline
    between = [[e for e in part if e.startswith("q")] for part in " ".join(timeline).split("fold")]
    assert [len(part) for part in between] == [2, 2, 2, 2], timeline  # 2 before the 1st fold, 2 after each
    assert timeline.count("door") == 3, "standing questions are answered after their fold, outside the share"
    assert queue.counts()["one-off"] == 30 - 8
    queue.cancel("q29")  # still in the queue, so a client that went away costs nothing
    behind[0] = False
    runner.poll()
    assert queue.counts()["one-off"] == 0 and sum(e.startswith("q") for e in timeline) == 29
    with pytest.raises(ValueError, match="answers_per_fold"):
        StreamRunner("cam", context, queue, [], answers_per_fold=0)


def test_the_status_says_when_positions_were_compressed(qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, EMLoCSettings(layer_group_size=2, chunk_frames=8, temporal_range=6))
    runner = StreamRunner("cam", context, QuestionQueue(), [Collect()], max_new_tokens=2)
    for frame in frames(16):
        runner.feed(frame)
    runner.finish()
    assert runner.status.temporal_scale == context.temporal.scale == 0.5  # 8 temporal steps into 6 positions
    assert runner.status.to_dict()["temporal_scale"] == 0.5


def test_questions_are_the_observers(qwen2_vl, tokenizer):
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS)
    queue = QuestionQueue()
    queue.submit(Question("s", "is anyone at the door ?", every=5))
    queue.submit(Question("w", "what colour was the star ?", at=100.0))
    runner = StreamRunner("cam", context, queue, [Collect()])
    for frame in frames(8):
        runner.feed(frame)
    observers = context.records[-1].observers
    assert [o.text for o in observers] == ["what colour was the star ?", "is anyone at the door ?"]


def test_jsonl_sink_writes_whole_lines_and_recovers_a_torn_one(tmp_path):
    path = tmp_path / "answers.jsonl"
    sink = JsonLinesSink(path)
    event = AnswerEvent("cam", "q1", "what ?", "red", (0.0, 1.5), 1.0, 10, 0.01)
    sink.deliver(event)
    sink.close()
    with path.open("a") as f:
        f.write('{"stream_id": "cam", "quest')  # a writer killed mid-line
    assert [a["question_id"] for a in read_answers(path)] == ["q1"]
    sink = JsonLinesSink(path)
    sink.deliver(AnswerEvent("cam", "q2", "what ?", "blue", None, 2.0, 10, 0.01))
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in lines] == ["q1", "q2"]
    assert json.loads(lines[0])["time_span"] == [0.0, 1.5]


@pytest.mark.slow
def test_batch_resumes_and_answers_every_question_once(tmp_path):
    videos = tmp_path / "videos"
    for seed in range(3):
        video = make_video(3_200_000 + seed, frames=128)
        write_video(videos / f"v{seed}.mp4", video.frames, video.fps)
    (videos / "broken.mp4").write_bytes(b"\x00" * 500)
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"id": "colour", "question": "what colour was the triangle ?"},
        {"id": "digit", "question": "what digit is on screen now ?"},
        {"id": "early", "question": "how many times did a star appear ?", "at": 20}]) + "\n")
    out = tmp_path / "answers.jsonl"
    command = [console_script(), "batch", str(videos), "--questions", str(questions), "--out", str(out)]
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while len(read_answers(out)) < 3 and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # interrupted: some videos answered, some not
    first.wait()
    answered_before = len(read_answers(out))
    assert 3 <= answered_before < 9
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 1 and "broken.mp4" in second.stderr  # the broken video is named, the rest done
    assert "already answered, skipped" in second.stdout
    answers = read_answers(out)
    pairs = [(a["stream_id"].rsplit("/", 1)[-1], a["question_id"]) for a in answers]
    assert sorted(pairs) == sorted((f"v{s}.mp4", q) for s in range(3) for q in ("colour", "digit", "early"))
    early = [a for a in answers if a["question_id"] == "early"]
    assert all(a["time_span"][1] >= 20 for a in early)
