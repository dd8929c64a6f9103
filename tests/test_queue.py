"""Queue limits one client cannot exhaust, cancellation, redelivery, and questions before any video."""

import math

import pytest

from emloc import EMLoCSettings, StreamContext
from sinks import Sink
from stream.questions import BadQuestion, DuplicateId, Question, QuestionQueue, QueueFull
from stream.runtime import StreamRunner
from stream.sources import Frame

from .reference import random_frames

SETTINGS = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.5, 1.0), chunk_frames=8)


class Collect(Sink):
    def __init__(self):
        self.events = []

    def deliver(self, event):
        self.events.append(event)


@pytest.mark.parametrize("at", [math.nan, math.inf, -math.inf, -1.0, True, "5"])
def test_at_must_be_a_finite_time(at):
    with pytest.raises(BadQuestion, match="'at' must be a finite number"):
        Question("x", "what ?", at=at)


def test_at_beyond_the_horizon_is_refused_and_the_horizon_moves_with_the_stream():
    queue = QuestionQueue(horizon=600)
    with pytest.raises(BadQuestion, match="more than 600 s .* beyond the stream's time 0.0 s"):
        queue.submit(Question("far", "what ?", at=1e12))
    queue.submit(Question("edge", "what ?", at=600))
    queue.take_due(1000.0, 0, False)  # the stream reached 1000 s
    queue.submit(Question("later", "what ?", at=1500))  # 1500 <= 1000 + 600


def test_each_kind_has_its_own_limit_so_far_future_questions_cannot_starve_one_offs():
    queue = QuestionQueue(max_waiting=3, max_scheduled=4, max_standing=2, horizon=3600)
    for k in range(4):
        queue.submit(Question(f"far{k}", "what ?", at=3000.0 + k))
    with pytest.raises(QueueFull, match="4 scheduled questions are held"):
        queue.submit(Question("far4", "what ?", at=3500.0))
    for k in range(2):
        queue.submit(Question(f"s{k}", "is anyone at the door ?", every=1))
    with pytest.raises(QueueFull, match="2 standing questions .* cancel one"):
        queue.submit(Question("s2", "is anyone at the door ?", every=1))
    for k in range(3):  # one-offs still have all their places
        queue.submit(Question(f"now{k}", "what ?"))
    with pytest.raises(QueueFull, match="3 one-off questions"):
        queue.submit(Question("now3", "what ?"))
    assert queue.counts() == {"one-off": 3, "scheduled": 4, "standing": 2}


def test_scheduled_questions_come_due_in_time_order():
    queue = QuestionQueue()
    for qid, at in [("c", 30.0), ("a", 10.0), ("d", 30.0), ("b", 20.0)]:
        queue.submit(Question(qid, "what ?", at=at))
    assert [q.id for q in queue.take_due(15.0, 0, False)] == ["a"]
    assert [q.id for q in queue.take_due(30.0, 0, False)] == ["b", "c", "d"]  # equal times: arrival order
    assert queue.waiting() == 0


def test_cancel_by_id_frees_the_place_and_unknown_ids_are_named():
    queue = QuestionQueue(max_standing=1)
    queue.submit(Question("door", "is anyone at the door ?", every=2))
    queue.submit(Question("later", "what ?", at=5.0))
    assert queue.cancel("door").text == "is anyone at the door ?"
    assert queue.take_due(5.0, 2, chunk_just_folded=True)[0].id == "later"  # the standing one is gone
    queue.submit(Question("door2", "is anyone at the door ?", every=2))  # its place is free again
    with pytest.raises(BadQuestion, match="no waiting or standing question has id 'nope'"):
        queue.cancel("nope")
    assert queue.observers() == ["is anyone at the door ?"]


def test_an_id_is_answered_once():
    queue = QuestionQueue()
    queue.submit(Question("q7", "what colour ?"))
    assert [q.id for q in queue.take_due(None, 0, False)] == ["q7"]
    with pytest.raises(DuplicateId) as same:  # redelivered after it was answered: still recognised
        queue.submit(Question("q7", "what colour ?"))
    assert same.value.same
    with pytest.raises(DuplicateId, match="for another question") as other:
        queue.submit(Question("q7", "what shape ?"))
    assert not other.value.same
    assert queue.new_id() != "q7"


@pytest.mark.parametrize("qid", ["", "x" * 129, "a\nb", "a\x00", 7])
def test_ids_are_short_printable_strings(qid):
    with pytest.raises(BadQuestion, match="'id'"):
        Question(qid, "what ?")


def test_no_answer_before_the_first_frame_unless_the_question_waits(qwen2_vl, tokenizer):
    sink, errors = Collect(), []
    queue = QuestionQueue()
    runner = StreamRunner("door", StreamContext(qwen2_vl, tokenizer, SETTINGS), queue, [sink], max_new_tokens=2,
                          on_error=lambda qid, message: errors.append((qid, message)),
                          source_state=lambda: "reconnecting")
    queue.submit(Question("now", "what is on screen ?"))
    queue.submit(Question("patient", "what is on screen ?", wait=True))
    runner.poll()
    assert errors == [("now", 'stream door has no video yet (state: reconnecting); ask with "wait": true to be '
                              'answered once it has')]
    assert sink.events == [] and queue.waiting() == 1
    images = random_frames(8, seed=2)
    runner.feed(Frame(images[0], 0.0))  # one frame: a partial chunk is video enough
    assert [e.question_id for e in sink.events] == ["patient"] and sink.events[0].time_span == (0.0, 0.0)
    assert len(errors) == 1


def test_a_waiting_question_at_the_end_of_a_stream_without_video_is_an_error(qwen2_vl, tokenizer):
    errors = []
    queue = QuestionQueue()
    runner = StreamRunner("dead", StreamContext(qwen2_vl, tokenizer, SETTINGS), queue, [Collect()],
                          on_error=lambda qid, message: errors.append((qid, message)))
    queue.submit(Question("patient", "what ?", wait=True))
    runner.finish()
    assert [qid for qid, _ in errors] == ["patient"] and "has no video yet" in errors[0][1]
