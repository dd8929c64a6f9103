"""Realtime sessions for real: `emloc-stream live --http` with the shipped model; Python clients stream a
synthetic video's frames over WebSocket (/v1/realtime) and ask over the same socket; answers checked
against the video's ground truth; bad input gets clear error events and costs nothing else; a flood
makes the stream drop its oldest waiting frames, reported as live sources report drops. Also: the
official `openai` client lists the streams (`models.list()`), /docs loads nothing from elsewhere, and
the token, Host and Origin rules hold for WebSockets.

The server also serves a camera stream (UDP, nothing sent to it): realtime streams are made beside it.
Seed 3_000_100 (never trained on), 128 frames at 2 fps; frames pushed as JPEG with their own
timestamps, one chunk (16 frames) at a time, each waiting for its `input_video_frame.folded`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the http extra is not installed (pip install -e '.[http,test]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[test]')")
ws_client = pytest.importorskip("websockets.sync.client", reason="pip install -e '.[test]' (websockets)")

from PIL import Image  # noqa: E402

from stream.models import DEFAULT_MODEL  # noqa: E402
from stream.suites.synthetic import COUNT_WORDS, make_video  # noqa: E402

from .broker import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED, FRAMES, CHUNK = 3_000_100, 128, 16
NEEDLE = "what colour was the triangle ?"
DIGIT = "what digit is on screen now ?"
MIN_STANDING_CORRECT = 6 / 8


def jpeg(image, quality: int = 90) -> str:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return base64.b64encode(out.getvalue()).decode()


def digit_at(video, t: float) -> str:
    step = int(t + 1e-6)
    return COUNT_WORDS[[d for start, d in video.digits if start <= step][-1]]


def until(condition, timeout=30.0, step=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


class Session:
    """A realtime session from the Python side: send events, read them until one matches."""

    def __init__(self, base: str, model: str | None = None, created: bool = True, **options) -> None:
        url = base.replace("http://", "ws://") + "/v1/realtime" + (f"?model={model}" if model else "")
        self.socket = ws_client.connect(url, max_size=None, open_timeout=10, **options).__enter__()
        self.seen: list[dict] = []
        self.session = self.expect("session.created")["session"] if created else None

    def send(self, **event) -> None:
        self.socket.send(json.dumps(event))

    def expect(self, kind: str, timeout: float = 60.0, where=lambda e: True) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                event = json.loads(self.socket.recv(timeout=max(0.01, deadline - time.time())))
            except TimeoutError:
                break
            self.seen.append(event)
            if event["type"] == kind and where(event):
                return event
        raise AssertionError(f"no {kind} within {timeout} s; got {[e['type'] for e in self.seen[-20:]]}")

    def error(self, timeout: float = 10.0) -> dict:
        return self.expect("error", timeout)["error"]

    def close(self) -> None:
        self.socket.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("realtime")
    config = folder / "live.yaml"
    config.write_text("emloc:\n  preset: videomme_online\n  layer_group_size: 2\n  chunk_frames: 16\n")
    udp, port = free_port(socket.SOCK_DGRAM), free_port()
    server = subprocess.Popen([sys.executable, "-m", "stream", "live", f"udp://127.0.0.1:{udp}", "--config",
                               str(config), "--stream-id", "cam", "--http", f"127.0.0.1:{port}", "--buffer", "24",
                               "--max-new-tokens", "4", "--status-every", "1", "--http-realtime-streams", "3"],
                              cwd=ROOT, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        assert until(lambda: _healthy(base) or server.poll() is not None, timeout=120) and server.poll() is None, \
            (folder / "server.log").read_text()
        yield dict(base=base, video=make_video(SEED, frames=FRAMES), folder=folder)
    finally:
        server.kill()
        server.wait()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_frames_and_questions_over_websocket_answer_like_the_video(served):
    video, base = served["video"], served["base"]
    session = Session(base, "phone")
    assert session.session["stream_id"] == "phone" and session.session["chunk_frames"] == CHUNK
    session.send(type="response.create", event_id="ask-1", response={"question": DIGIT, "every": 1})
    standing = session.expect("response.created")["response"]
    assert standing["kind"] == "standing" and standing["status"] == "in_progress"
    folded = []
    for start in range(0, FRAMES, CHUNK):
        for i in range(start, start + CHUNK):
            session.send(type="input_video_frame.append", image=jpeg(video.frames[i]), timestamp=i / video.fps)
        folded.append(session.expect("input_video_frame.folded", timeout=120))
    assert [f["time_span"] for f in folded] == [[0.0, (i + CHUNK - 1) / 2] for i in range(0, FRAMES, CHUNK)]
    assert [f["frames"] for f in folded] == [CHUNK] * (FRAMES // CHUNK)
    session.send(type="input_video_frame.commit")
    committed = session.expect("input_video_frame.committed")
    assert committed["frames_received"] == FRAMES and committed["frames_dropped"] == 0
    session.send(type="response.create", response={"question": NEEDLE})
    asked = session.expect("response.created")["response"]
    done = session.expect("response.done", where=lambda e: e["response"]["id"] == asked["id"])["response"]
    assert done["status"] == "completed" and done["output_text"] == video.question("needle").answer
    answers = [e for e in session.seen if e["type"] == "response.output_text.done"
               and e["response_id"] == standing["id"]]
    assert [a["time_span"][1] for a in answers] == pytest.approx([8 * k - 0.5 for k in range(1, 9)], abs=0.01)
    note = json.loads((DEFAULT_MODEL / "config.json").read_text())["emloc_model_note"]  # the shipped model serves
    assert {a.get("model_note") for a in answers} == {note} and "synthetic video only" in note
    correct = sum(a["text"] == digit_at(video, a["time_span"][1]) for a in answers)
    assert correct / len(answers) >= MIN_STANDING_CORRECT, [(a["text"], a["time_span"]) for a in answers]
    session.send(type="response.cancel", response_id=standing["id"])
    assert session.expect("response.done", where=lambda e: e["response"]["id"] == standing["id"])["response"][
        "status"] == "cancelled"
    # the stream is one like any other: REST sees it, and its answers
    status = httpx.get(f"{base}/streams/phone").json()
    assert status["chunks_folded"] == FRAMES // CHUNK and status["frames_dropped"] == 0
    assert status["state"] == "running"
    session.close()
    assert until(lambda: httpx.get(f"{base}/streams/phone").json()["state"] == "reconnecting", timeout=10)
    again = Session(base, "phone")  # a later session goes on with the same stream (and its cache)
    again.send(type="response.create", response={"question": NEEDLE})
    done = again.expect("response.done")["response"]
    assert done["output_text"] == video.question("needle").answer
    again.close()


BAD_EVENTS = [  # (raw message, error code, words the message must hold)
    ('{"type": "input_video_frame.append", "image": "' + base64.b64encode(b"\x00garbage" * 40).decode() + '"}',
     "invalid_frame", "neither JPEG nor PNG"),
    ("TRUNCATED_JPEG", "invalid_frame", "does not decode"),
    ('{"type": "input_video_frame.append", "image": "not base64 at all!"}', "invalid_frame", "not valid base64"),
    ('{"type": "input_video_frame.append", "image": "data:text/html;base64,PGI+"}', "invalid_frame", "data: URL"),
    ('{"type": "input_video_frame.append"}', "invalid_frame", "'image' must be"),
    ('{"type": "input_video_frame.append", "image": "SMALL_JPEG", "timestamp": -1}', "invalid_frame",
     "'timestamp' must be"),
    ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "unknown_event", "unknown event type"),
    ('{"type": "response.create", "response": {"question": "hi ?", "every": 0}}', "invalid_question",
     "'every' must be"),
    ('{"type": "response.create", "response": {"question": "hi ?", "colour": "red"}}', "invalid_question",
     "unknown field(s) ['colour']"),
    ('{"type": "response.create", "response": "what ?"}', "invalid_question", "must be a JSON object"),
    ('{"type": "response.cancel", "response_id": "q999"}', "unknown_response", "no response 'q999'"),
    ('{"type": "input_video_frame.commit", "extra": 1}', "unknown_field", "no field 'extra'"),
    ("{broken", "invalid_json", "not JSON"),
    ("[1, 2]", "invalid_event", "JSON object with a string 'type'"),
    ("HUGE", "message_too_large", "the limit is 4194304"),
    (b"\xff\xd8\xff binary", "binary_message", "JSON text messages"),
]


@pytest.mark.slow
def test_bad_input_gets_clear_error_events_and_the_session_lives_on(served):
    video, base = served["video"], served["base"]
    session = Session(base, "tablet")
    small = jpeg(video.frames[0])
    good = base64.b64decode(small)
    for raw, code, words in BAD_EVENTS:
        if raw == "TRUNCATED_JPEG":
            raw = json.dumps({"type": "input_video_frame.append", "image": base64.b64encode(good[:200]).decode(),
                              "event_id": "evt-7"})
        elif raw == "HUGE":
            raw = json.dumps({"type": "input_video_frame.append", "image": "A" * (5 * 2**20)})
        elif isinstance(raw, str):
            raw = raw.replace("SMALL_JPEG", small)
        session.socket.send(raw)
        error = session.error()
        assert error["code"] == code and words in error["message"], (code, error)
        if code == "invalid_frame" and "does not decode" in words:
            assert error["event_id"] == "evt-7"
    big = video.frames[0].repeat(2, axis=0).repeat(2, axis=1)
    session.send(type="input_video_frame.append", image=small, timestamp=0.0)
    session.send(type="input_video_frame.append", image=jpeg(big), timestamp=0.5)  # another size
    assert "this stream's frames are 56x56" in session.error()["message"]
    session.send(type="input_video_frame.append", image=small, timestamp=0.0)  # not after the last
    assert "timestamps must increase" in session.error()["message"]
    session.send(type="input_video_frame.append", image=small)  # no timestamp in a session that gave them
    assert "give one with every frame" in session.error()["message"]
    # none of it cost anything: one frame taken, no question left behind; the session still works
    session.send(type="input_video_frame.commit")
    committed = session.expect("input_video_frame.committed")
    assert committed["frames_received"] == 1 and committed["frames_dropped"] == 0
    status = httpx.get(f"{base}/streams/tablet").json()
    assert status["waiting"] == 0 and status["standing"] == []
    for i in range(1, 2 * CHUNK):
        session.send(type="input_video_frame.append", image=jpeg(video.frames[i]), timestamp=i / video.fps)
    session.expect("input_video_frame.folded", timeout=120)
    session.send(type="response.create", response={"question": DIGIT})
    done = session.expect("response.done", timeout=60)["response"]
    assert done["status"] == "completed" and done["output_text"] == digit_at(video, (2 * CHUNK - 1) / 2)
    session.close()


@pytest.mark.slow
def test_a_flood_drops_the_oldest_waiting_frames_and_reports_it(served):
    """More frames than folding takes: the buffer (24) keeps the newest, the status counts the rest."""
    video, base = served["video"], served["base"]
    session = Session(base, "phone")  # the first test's stream
    frames = [jpeg(f) for f in video.frames]
    start = httpx.get(f"{base}/streams/phone").json()
    session.send(type="input_video_frame.commit")
    received = session.expect("input_video_frame.committed")["frames_received"]
    count = 6 * CHUNK
    for i in range(count):  # as fast as the socket takes them; a session's first frame follows the stream's newest
        session.send(type="input_video_frame.append", image=frames[i % FRAMES], timestamp=1000 + i / 2)
    session.send(type="input_video_frame.commit")
    committed = session.expect("input_video_frame.committed")
    assert committed["frames_received"] == received + count  # every frame arrived
    assert until(lambda: httpx.get(f"{base}/streams/phone").json()["lag_s"] == 0, timeout=120)
    status = httpx.get(f"{base}/streams/phone").json()
    dropped = status["frames_dropped"]
    assert dropped > 0, "folding six chunks takes longer than pushing them"
    assert status["frames_seen"] - start["frames_seen"] == count - dropped
    assert status["stream_time"] == pytest.approx(start["stream_time"] + count / 2), "the newest frames are kept"
    assert session.expect("stream.status", where=lambda e: e["status"]["frames_dropped"] == dropped)
    text = httpx.get(f"{base}/metrics").text
    assert f'emloc_frames_dropped_total{{stream="phone"}} {float(dropped)}' in text
    session.close()


@pytest.mark.slow
def test_openai_client_lists_the_streams_as_models(served):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
    client = openai.OpenAI(base_url=served["base"] + "/v1", api_key="unused-on-loopback", max_retries=0)
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "cam" and set(ids) <= {"cam", "phone", "tablet", "laptop", "emloc-tiny-qwen2vl"}
    assert ids[-1] == "emloc-tiny-qwen2vl"  # the model itself, for video_url parts (tests/test_http_video.py)
    assert client.models.retrieve("cam").owned_by == "emloc-stream"
    with pytest.raises(openai.NotFoundError, match="not a stream here"):
        client.models.retrieve("garage")


@pytest.mark.slow
def test_docs_load_nothing_from_elsewhere(served):
    base = served["base"]
    for path in ("/docs", "/redoc"):
        page = httpx.get(base + path)
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        for url in urls:
            assert httpx.get(base + url).status_code == 200, url
    assert "fonts.googleapis" not in httpx.get(base + "/redoc").text


def test_websocket_token_host_and_origin_rules(monkeypatch):
    from websockets.exceptions import InvalidStatus

    from stream.config import Config, StreamConfig
    from stream.engine import RANDOM_MODEL, build_model
    from stream.http import HttpLimits, HttpServer
    from stream.pushed import PushedFrames
    from stream.service import LiveStream

    adapter, settings, _ = build_model(Config(), RANDOM_MODEL)

    def open_stream(stream_id: str) -> LiveStream:
        return LiveStream(StreamConfig(id=stream_id, source=f"realtime:{stream_id}"), adapter, settings, fps=2.0,
                          console=False, source=PushedFrames(fps=2.0))
    streams = [open_stream("fixed")]
    port = free_port()
    server = HttpServer(streams, f"0.0.0.0:{port}", token="s3cret-token", open_stream=open_stream,
                        limits=HttpLimits(realtime_streams=3)).start()
    base = f"http://127.0.0.1:{port}"
    try:
        for options in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}},
                        {"subprotocols": ["realtime", "bearer.wrong"]}):
            with pytest.raises(InvalidStatus) as refused:
                Session(base, "a", **options)
            assert refused.value.response.status_code == 401 and b"bearer token" in refused.value.response.body
        by_header = Session(base, "a", additional_headers={"Authorization": "Bearer s3cret-token"})
        assert by_header.session["stream_id"] == "a"
        by_protocol = Session(base, "b", subprotocols=["realtime", "bearer.s3cret-token"])
        assert by_protocol.socket.subprotocol == "realtime"
        good = {"Authorization": "Bearer s3cret-token"}
        with pytest.raises(InvalidStatus) as refused:  # a page elsewhere cannot open a session here
            Session(base, "c", additional_headers=dict(good, Origin="http://evil.example"))
        assert refused.value.response.status_code == 403 and b"origin 'http://evil.example'" in \
            refused.value.response.body
        with pytest.raises(InvalidStatus) as refused:  # nor under a name of its own (DNS rebinding)
            Session(f"http://127.0.0.2:{port}", "c", additional_headers=good)
        assert refused.value.response.status_code == 421
        same_origin = Session(base, "c", additional_headers=dict(good, Origin=f"http://localhost:{port}"))
        refused = Session(base, "fixed", created=False, additional_headers=good)  # it has a source of its own
        assert "reads its own source" in refused.error()["message"]
        busy = Session(base, "a", created=False, additional_headers=good)
        assert "has a realtime session already" in busy.error()["message"]
        fourth = Session(base, "d", created=False, additional_headers=good)  # a, b and c are the limit
        assert "holds 3 realtime streams, its limit" in fourth.error()["message"]
        assert [m["id"] for m in httpx.get(base + "/v1/models", headers=good).json()["data"]] == \
            ["fixed", "a", "b", "c"]
        for session in (by_header, by_protocol, same_origin):
            session.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_serve_without_a_config_takes_realtime_sessions_only():
    """What a laptop needs: no camera server, no config; the page's camera (or any client) makes the stream."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "stream", "serve"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "serve needs --config (the streams it serves) or --http" in run.stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "stream", "serve", "--http", f"127.0.0.1:{port}", "--model",
                               "builtin:random", "--max-new-tokens", "2"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        assert until(lambda: _healthy(base) or server.poll() is not None, timeout=120) and server.poll() is None
        assert httpx.get(base + "/streams").json() == []
        session = Session(base)
        stream_id = session.session["stream_id"]
        assert stream_id.startswith("rt-")
        chunk = session.session["chunk_frames"]  # the default settings' (64)
        frames = make_video(SEED, frames=chunk).frames
        for i, image in enumerate(frames):
            session.send(type="input_video_frame.append", image=jpeg(image), timestamp=i / 2)
            if i % 8 == 7:  # within the buffer of 16 (serve's default): nothing dropped
                assert until(lambda: session.send(type="input_video_frame.commit") or session.expect(
                    "input_video_frame.committed")["frames_waiting"] == 0, timeout=30)
        assert session.expect("input_video_frame.folded", timeout=60)["frames"] == chunk
        session.send(type="response.create", response={"question": NEEDLE})
        assert session.expect("response.done", timeout=60)["response"]["status"] == "completed"
        assert httpx.get(f"{base}/streams/{stream_id}").json()["frames_dropped"] == 0
        assert [s["stream_id"] for s in httpx.get(base + "/streams").json()] == [stream_id]
        session.close()
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow
def test_page_camera_streams_a_fake_camera_and_answers_about_it(served, tmp_path):
    """The page's "use my camera" in a real Chromium whose fake camera plays a y4m made here from a synthetic
    video, each frame held 1 s (the page sends about 2 frames a second, so each of the video's steps, two
    frames, spans about 4 sent frames and at least one whole pair); answers checked against its truth."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver and shutil.which("ffmpeg")):
        pytest.skip("Debian's chromium, chromium-driver and ffmpeg are needed")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.common.by import By

    video = make_video(CAMERA_SEED, frames=32)
    raw = tmp_path / "video.rgb"
    raw.write_bytes(video.frames.tobytes())
    y4m = tmp_path / "camera.y4m"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "56x56", "-r", "1",
                    "-i", str(raw), "-r", "10", "-pix_fmt", "yuv420p", str(y4m)], check=True, timeout=60)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={y4m}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    base = served["base"]
    try:
        browser.get(base + "/")
        browser.find_element(By.ID, "camera-name").clear()
        browser.find_element(By.ID, "camera-name").send_keys("laptop")
        browser.find_element(By.ID, "camera-start").click()
        card = '[data-stream="laptop"]'
        assert until(lambda: browser.find_elements(By.CSS_SELECTOR, card), timeout=20), \
            browser.find_element(By.ID, "camera-state").text
        # one whole loop of the video (16 steps of 2 s): 4 chunks of 16 frames at 2 frames a second
        assert until(lambda: httpx.get(f"{base}/streams/laptop").json()["chunks_folded"] >= 4, timeout=120), \
            (httpx.get(f"{base}/streams/laptop").json(), browser.find_element(By.ID, "camera-state").text)
        browser.find_element(By.ID, "camera-start").click()  # stop: the stream keeps what it saw
        status = httpx.get(f"{base}/streams/laptop").json()
        assert status["frames_dropped"] == 0
        for kind in ("needle", "order"):
            box = browser.find_element(By.CSS_SELECTOR, f"{card} .ask-input")
            box.send_keys(video.question(kind).text)
            browser.find_element(By.CSS_SELECTOR, f"{card} .ask-button").click()
            assert until(lambda: browser.execute_script(f"return document.querySelector('{card}').dataset.asked"),
                         timeout=10)
            asked = browser.execute_script(f"return document.querySelector('{card}').dataset.asked")
            item = f'{card} .answers li[data-question="{asked}"] .a'
            assert until(lambda item=item: browser.find_elements(By.CSS_SELECTOR, item), timeout=60)
            assert browser.find_element(By.CSS_SELECTOR, item).text == "A: " + video.question(kind).answer, kind
            browser.execute_script(f"delete document.querySelector('{card}').dataset.asked")
        browser.get(base + "/docs")  # the API docs render with nothing from elsewhere (this browser has no internet)
        assert until(lambda: browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"), timeout=20)
        assert "emloc-stream" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith(base + "/") for u in loaded), loaded
    finally:
        browser.quit()


CAMERA_SEED = 3_000_101  # its square and circle come after the first two steps (the page starts a moment late)
