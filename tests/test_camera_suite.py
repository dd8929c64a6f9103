"""The camera-like suite: deterministic, its ground truth visible in the frames, and answered by
its model with full context through the real pipeline (H.264 file, decoded, chunked, folded).

Ground truth is checked from the pixels, independently of the renderer: an event's colour is
read where the event's box is, at the times it is said to be shown and not just before; the
display's digit is read from its seven segments. Model seeds 3_000_000+ were never trained on
(training uses 10_000_000+), never used to pick the checkpoint (1_000_000+) and are not in
research/eval_suite.py's figures (2_000_000+); benchmarks/agnostic.py's camera rows start at the
same seeds (its first 8 videos are the model test's).
"""


import numpy as np
import pytest

from stream.models import CAMERA_MODEL
from stream.suites.camera import CLIPS, DISPLAY, PROBE, QUESTION_TYPES, WHEN_WORDS, make_video
from stream.suites.synthetic import COLOURS, COUNT_WORDS, SEGMENTS

MODEL = CAMERA_MODEL
SEEDS = [5, 17, 2024]


@pytest.fixture(scope="module")
def videos():
    return [make_video(seed, frames=128) for seed in SEEDS]


def test_same_seed_same_video_other_seed_other_video():
    a, b, c = make_video(11, frames=64), make_video(11, frames=64), make_video(12, frames=64)
    assert np.array_equal(a.frames, b.frames) and a.questions == b.questions and a.events == b.events
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (64, 112, 112, 3) and a.frames.dtype == np.uint8


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        make_video(0, frames=30)
    with pytest.raises(ValueError):
        make_video(0, frames=64, size=100)


def exact_colour(pixels: np.ndarray, colour: str) -> np.ndarray:
    return (pixels == np.array(COLOURS[colour], np.uint8)).all(-1)


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_every_event_is_in_the_frames_where_and_when_stated(videos, index):
    video = videos[index]
    assert len(video.events) == 3 + COUNT_WORDS.index(video.question("count").answer)
    for event in video.events:
        assert 1 <= event.steps <= 4 and event.size >= 30  # seconds long, several tokens wide
        for frame in range(2 * event.start, 2 * event.end):
            y, x = event.corner(frame)
            box = video.frames[frame, y:y + event.size, x:x + event.size]
            share = exact_colour(box, event.colour).mean()
            assert 0.15 <= share <= 0.8, (event, frame, share)  # the shape, in its colour, not a block of it
        if event.start > 0:  # the frame pair before: the object is not there yet
            y, x = event.corner(2 * event.start)
            before = video.frames[2 * event.start - 1, y:y + event.size, x:x + event.size]
            assert exact_colour(before, event.colour).mean() < 0.1, event


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_answers_follow_from_the_events(videos, index):
    video = videos[index]
    steps = len(video.frames) // 2
    spans = sorted((e.start, e.end) for e in video.events)
    assert all(a_end < b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "one event at a time"
    triangle = next(e for e in video.events if e.shape == "triangle")
    assert video.question("needle").answer == triangle.colour
    first = min((e for e in video.events if e.shape in ("square", "circle")), key=lambda e: e.start)
    assert video.question("order").answer == first.shape
    middle = (triangle.start + triangle.steps / 2) / steps
    assert video.question("when").answer == WHEN_WORDS[int(middle * 3)]
    assert min(abs(middle - 1 / 3), abs(middle - 2 / 3)) >= 0.05, "never ambiguous"
    assert video.question("state").answer == COUNT_WORDS[read_display(video.frames[-1])]
    assert [q.kind for q in video.questions] == list(QUESTION_TYPES)
    assert video.clip in CLIPS
    description = video.description().split()
    assert description[1:3] == [triangle.colour, video.question("when").answer]
    assert description[-1] == video.question("state").answer


@pytest.mark.parametrize("seed", [3, 8, 40])
def test_an_early_needle_is_shown_in_the_window_and_only_there(seed):
    """needle_before (the 4,096-frame budget benchmark): the triangle is shown, in its colour, and
    gone again within the first 5% of the video, and never after; the other events keep their order
    and the answers still follow from them."""
    frames = 640  # 320 steps: a 16-step window
    video = make_video(seed, frames=frames, needle_before=0.05)
    plain = make_video(seed, frames=frames)
    triangle = next(e for e in video.events if e.shape == "triangle")
    window = int(0.05 * frames / 2)
    assert video.events[0] is triangle and triangle.end <= window
    assert video.question("needle").answer == triangle.colour and video.question("when").answer == "beginning"
    assert [e.shape for e in video.events[1:]] == [e.shape for e in plain.events if e.shape != "triangle"]
    for frame in range(2 * triangle.start, 2 * triangle.end):
        y, x = triangle.corner(frame)
        box = video.frames[frame, y:y + triangle.size, x:x + triangle.size]
        assert exact_colour(box, triangle.colour).mean() > 0.15, "shown in the window"
    spans = sorted((e.start, e.end) for e in video.events)
    assert all(a_end < b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "one event at a time"
    owner = video.owner == 2 + video.events.index(triangle)
    assert owner[triangle.start:triangle.end].any((1, 2)).all() and not owner[triangle.end:].any()
    with pytest.raises(ValueError, match="needle_before"):
        make_video(seed, frames=64, needle_before=0.5)
    with pytest.raises(ValueError, match="no whole frame pair"):
        make_video(seed, frames=32, needle_before=0.05)  # 16 steps: a window of 0.8


def read_display(frame: np.ndarray) -> int:
    """The seven-segment digit in the display, read from the brightness at each segment's centre."""
    s = DISPLAY / 28  # the display is the 28-pixel digit scaled up
    centres = {"a": (4, 14), "b": (8, 18), "c": (19, 18), "d": (22, 14), "e": (19, 8), "f": (8, 8), "g": (14, 14)}
    lit = {seg for seg, (y, x) in centres.items() if frame[int(y * s), int(x * s)].mean() > 128}
    matches = [d for d, segs in SEGMENTS.items() if set(segs) == lit]
    assert len(matches) == 1, lit
    return matches[0]


def test_the_display_changes_as_stated():
    video = make_video(31, frames=128)
    for start, digit in video.digits:
        assert read_display(video.frames[2 * start]) == digit
        assert read_display(video.frames[2 * start + 1]) == digit


def test_background_is_moving_footage_and_distractors_move():
    video = make_video(8, frames=64)
    below = video.frames[:, DISPLAY + 4:, :].astype(float)
    steps = np.abs(np.diff(below, axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0).mean() > 0.9, "the background changes from frame to frame"
    assert np.median(steps) < 20, "as footage does, not noise"
    assert video.distractors and all(d.corner(2 * d.start) != d.corner(2 * d.end - 1) for d in video.distractors)


def test_sixteen_tokens_per_frame_pair():
    from emloc import load_adapter

    if not MODEL.is_dir():
        pytest.skip("no camera model")
    adapter = load_adapter(str(MODEL))
    pixels = adapter.preprocess(make_video(3, frames=32).frames[:2])
    assert adapter.encode_video(pixels).shape[1] == 16
    words = " ".join([q.text + " " + q.answer for q in make_video(3, frames=32).questions] + [PROBE])
    assert adapter.tokenizer.unk_token_id not in adapter.tokenizer(words)["input_ids"], "every word is known"


# Thresholds over MODEL_VIDEOS fresh videos, set below what research/eval_suite.py measured on
# held-out seeds (see stream/models/emloc-tiny-camera/README.md), so that a broken model, loader,
# generator or pipeline fails while the model's honest misses do not. On 100 held-out videos it
# finds the object asked about (needle 90%), reads the display (state 100%), tells which shape came
# first (order 87%) and when the triangle appeared (when 78%); it counts poorly (36%, chance 25%), so
# count carries no floor of its own. On these 8 videos: full context 30/40 (needle, order, state
# 8/8, when 6/8, count 0/8), the default 29/40 at 7% kept; uniform frames at the default's share
# fail the default's check (docs/benchmarks/agnostic-camera.json has 16/40 on them).
MODEL_VIDEOS = 8
MIN_MEAN = 0.6  # chance 0.27
MIN_PER_KIND = {"needle": 0.75, "order": 0.75, "state": 0.75, "when": 0.5}
# The query-agnostic default (EMLoCSettings(), questions asked only after the video) on the same
# videos: at most this many answers (of 5 x MODEL_VIDEOS) below full context, at most this share of
# the video tokens kept on average (the JS search keeps more of some videos than of others).
DEFAULT_MAX_LOSS = 2  # uniform frames at its share lose 32 points (docs/benchmarks/agnostic-camera.md)
DEFAULT_MAX_KEPT = 0.25


@pytest.mark.slow
@pytest.mark.skipif(not MODEL.is_dir(), reason="no camera model")
def test_camera_model_answers_with_full_context_and_the_default_keeps_up(tmp_path):
    from emloc import StreamContext, load_adapter
    from emloc.policies import KeepAll
    from emloc.settings import EMLoCSettings, videomme_online
    from stream.job import answer_video
    from stream.sources import VideoFile, write_video

    adapter = load_adapter(str(MODEL))
    correct = {kind: 0 for kind in QUESTION_TYPES}
    default_right, kept = 0, []
    for i in range(MODEL_VIDEOS):
        video = make_video(3_000_000 + i, frames=256)
        frames = list(VideoFile(write_video(tmp_path / f"{i}.mp4", video.frames, video.fps)).frames(fps=video.fps))
        questions = [video.question(k).text for k in QUESTION_TYPES]
        full = StreamContext(adapter, settings=videomme_online(layer_group_size=2), policy=KeepAll())
        answers = answer_video(full, frames, questions, query_aware=False, max_new_tokens=3)
        for kind, answer in zip(QUESTION_TYPES, answers):
            correct[kind] += answer.text.strip() == video.question(kind).answer
        pruned = StreamContext(adapter, settings=EMLoCSettings(layer_group_size=2))
        answers = answer_video(pruned, frames, questions, query_aware=False, max_new_tokens=3)
        default_right += sum(a.text.strip() == video.question(k).answer for k, a in zip(QUESTION_TYPES, answers))
        kept.append(pruned.video_tokens_kept() / pruned.video_tokens_seen())
    accuracy = {kind: n / MODEL_VIDEOS for kind, n in correct.items()}
    assert sum(accuracy.values()) / len(accuracy) >= MIN_MEAN, accuracy
    for kind, floor in MIN_PER_KIND.items():
        assert accuracy[kind] >= floor, accuracy
    full_right = sum(correct.values())
    assert default_right >= full_right - DEFAULT_MAX_LOSS, (default_right, full_right, accuracy)
    assert sum(kept) / len(kept) <= DEFAULT_MAX_KEPT, kept


@pytest.mark.slow
@pytest.mark.skipif(not MODEL.is_dir(), reason="no camera model")
def test_demo_runs_the_camera_suite_with_its_model():
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "stream", "demo", "--suite", "camera", "--frames", "32", "--seed", "9",
                          "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "emloc-tiny-camera" in out.stdout and "112x112" in out.stdout
    video = make_video(9, frames=32)
    for question in video.questions:  # the suite's five questions, with its ground truth
        at = out.stdout.index(f"Q: {question.text}")
        assert f"(expected: {question.answer})" in out.stdout[at:].split("Q: ")[1]
