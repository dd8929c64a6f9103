"""The one video job (stream/job.py) in process, on the shipped model: what it decides (observers, when each
question is answered, which questions a batch's video gets, where a video_url may come from); the paths that
use it check answers against ground truth (test_end_to_end, test_ray, test_http_video). Fast: a 32-frame
synthetic video, no file, no subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc import InputError, StreamContext
from sinks import Sink
from stream.config import Config
from stream.engine import build_model
from stream.http.guard import HttpLimits
from stream.http.video import VideoAnswerer, VideoRefused
from stream.job import VideoJob, answer_video, batch_jobs, unmatched, video_names
from stream.questions import Question
from stream.sources import Frame
from stream.suites.synthetic import make_video


@pytest.fixture(scope="module")
def model():
    adapter, settings, _ = build_model(Config(), None)
    video = make_video(11, frames=32)
    frames = [Frame(image, i / video.fps) for i, image in enumerate(video.frames)]
    return adapter, settings, frames


def test_the_query_aware_choice_decides_the_observers(model):
    adapter, settings, frames = model
    for aware, kind in ((True, "question"), (False, "probe")):
        context, records = StreamContext(adapter, settings=settings), []
        answers = answer_video(context, frames, ["what colour was the square ?", "what digit is on screen now ?"],
                               query_aware=aware, max_new_tokens=2, on_fold=records.append)
        assert len(answers) == 2 and all(a is not None for a in answers)
        assert records and all(r.observers[0].kind == kind for r in records), [r.observers for r in records]
        assert [a.question for a in answers] == ["what colour was the square ?", "what digit is on screen now ?"]


def test_a_question_with_at_is_answered_there_the_others_at_the_end(model):
    adapter, settings, frames = model
    questions = [Question("end", "what digit is on screen now ?"), Question("early", "what digit ?", at=4.0)]
    delivered = Collect()
    end, early = answer_video(StreamContext(adapter, settings=settings), frames, questions, query_aware=True,
                              max_new_tokens=2, stream_id="clip", sinks=[delivered])
    assert end is not None and early is not None
    spans = {event.question_id: event.time_span for event in delivered.events}
    assert [event.question_id for event in delivered.events] == ["early", "end"]  # each as it came
    assert spans == {"early": (0.0, 4.0), "end": (0.0, frames[-1].time)}
    assert {event.stream_id for event in delivered.events} == {"clip"}


class Collect(Sink):
    def __init__(self) -> None:
        self.events = []

    def deliver(self, event) -> None:
        self.events.append(event)


def test_a_bad_question_is_named(model):
    adapter, settings, frames = model
    with pytest.raises(InputError, match="question 2"):
        answer_video(StreamContext(adapter, settings=settings), frames, ["fine ?", ""], query_aware=True)


def test_which_questions_a_video_of_a_batch_gets(tmp_path):
    root = tmp_path / "videos"
    a, b = root / "day1" / "a.mp4", root / "b.mp4"
    assert video_names(a, root) == {"a.mp4", str(a), "day1/a.mp4"}
    questions = [Question("all", "any ?"), Question("rel", "a ?", meta={"video": "day1/a.mp4"}),
                 Question("name", "b ?", meta={"video": "b.mp4"}), Question("gone", "c ?", meta={"video": "c.mp4"})]
    jobs = batch_jobs([a, b], root, questions, done={(str(b), "all"), (str(b), "name")})
    assert [(job.path, [q.id for q in job.questions], skipped) for job, skipped in jobs] == [
        (a, ["all", "rel"], None), (b, [], "already answered")]
    assert [q.id for q in unmatched([a, b], root, questions)] == ["gone"]
    assert batch_jobs([a], root, [questions[2]], set())[0][1] == "no question names this video"
    assert isinstance(jobs[0][0], VideoJob) and jobs[0][0].stream_id == str(a)


def test_where_a_video_url_may_come_from_is_decided_before_any_work(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "v.mp4").write_bytes(b"x" * 10)
    (outside / "s.mp4").write_bytes(b"x" * 10)
    (allowed / "link.mp4").symlink_to(outside / "s.mp4")
    videos = VideoAnswerer(None, None, fps=2.0, max_new_tokens=2, limits=HttpLimits(video_dirs=(str(allowed),)))
    assert videos.check(str(allowed / "v.mp4")) == ("file", str((allowed / "v.mp4").resolve()))
    assert videos.check(f"file://{allowed}/v.mp4")[0] == "file"
    assert videos.check("data:video/mp4;base64,AAAA") == ("data", "data:video/mp4;base64,AAAA")
    refusals = {str(outside / "s.mp4"): 403, f"{allowed}/../outside/s.mp4": 403, str(allowed / "link.mp4"): 403,
                str(allowed / "none.mp4"): 403, str(allowed): 400, "https://example.com/v.mp4": 403,
                "rtsp://127.0.0.1/cam": 403, "ftp://example.com/v.mp4": 400, "v.mp4": 400,
                "data:video/mp4,AAAA": 400, "data:image/png;base64,AAAA": 415}
    for url, status in refusals.items():
        with pytest.raises(VideoRefused) as refused:
            videos.check(url)
        assert refused.value.status == status, (url, str(refused.value))
    small = VideoAnswerer(None, None, fps=2.0, max_new_tokens=2, limits=HttpLimits(max_video_bytes=3))
    with pytest.raises(VideoRefused, match="the limit is 3 bytes"):
        small.check("data:video/mp4;base64,AAAAAAAA")
    assert Path(small.check("data:video/mp4;base64,AAAA")[1]).name  # 3 bytes: within the limit
    remote = VideoAnswerer(None, None, fps=2.0, max_new_tokens=2, limits=HttpLimits(video_remote=True))
    assert remote.check("https://example.com/v.mp4") == ("http", "https://example.com/v.mp4")
    with pytest.raises(VideoRefused, match="reads no video files"):
        remote.check("/etc/passwd")
