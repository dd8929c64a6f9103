"""`video_url` content parts in `/v1/chat/completions`, through the official `openai` client, against a real
`emloc-stream serve --http` with the shipped model (issue 27).

The server is started with one allowed folder (`--http-video-dir`), no remote sources, a video limit of
1 MiB and 40 s. Held-out synthetic videos (seeds 3_400_000 + i, never trained on) are asked about by
path and as base64 data: URLs, streamed and not; every answer is checked against the video's ground truth
(the query-aware job scores 90-100% on this suite: docs/benchmarks/fidelity.md; threshold 75%), and the
usage block against the same job run here, in this process. Then each bad input gets its own clear 4xx
and the server goes on answering.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed")
pytest.importorskip("fastapi", reason="the http extra is not installed (pip install -e '.[http,test]')")
httpx = pytest.importorskip("httpx")

from stream.sources import write_video  # noqa: E402
from stream.suites.synthetic import make_video  # noqa: E402

from .broker import free_port  # noqa: E402

pytestmark = [pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed"),
              pytest.mark.slow]  # a real server each; tests/test_job.py checks where a video may come from, fast
ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(3_400_000, 3_400_004)
ACCURACY = 0.75


@contextlib.contextmanager
def serving(log: Path, *flags: str, client_timeout: float):
    """`emloc-stream serve --http` with `flags` in a process of its own (its output in `log`), once it answers
    /health: its base URL and an official openai client for it; stopped after."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "stream", "serve", "--http", f"127.0.0.1:{port}", *flags],
                               cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert process.poll() is None, log.read_text()
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=client_timeout)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    videos = {}
    for seed in SEEDS:
        video = make_video(seed, frames=64)
        videos[seed] = (video, write_video(allowed / f"v{seed}.mp4", video.frames, video.fps))
    log = root / "server.log"
    with serving(log, "--http-video-dir", str(allowed), "--http-video-mb", "1", "--http-video-seconds", "40",
                 client_timeout=120) as (base, client):
        yield dict(client=client, base=base, videos=videos, allowed=allowed, outside=outside, root=root, log=log)


def ask(client, question: str, url: str, stream: bool = False):
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    return client.chat.completions.create(model="emloc", messages=messages, stream=stream,
                                          **({"stream_options": {"include_usage": True}} if stream else {}))


def data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def test_videos_by_path_and_as_data_urls_are_answered_right(server):
    client, right, total = server["client"], 0, 0
    assert [model.id for model in client.models.list()] == ["emloc-tiny-qwen2vl"]  # no streams: the model itself
    for i, (video, path) in enumerate(server["videos"].values()):
        url = str(path) if i % 2 else data_url(path)  # by path, and sent in the request
        for question in video.questions:
            reply = ask(client, question.text, url)
            answer = reply.choices[0].message.content
            right += answer.strip() == question.answer
            total += 1
            assert reply.choices[0].finish_reason == "stop"
            assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
            assert 1 <= reply.usage.completion_tokens <= 16 < reply.usage.prompt_tokens
    print(f"video_url: {right}/{total} answers right")
    assert right >= ACCURACY * total, f"{right}/{total} right"


def test_streamed_answers_and_usage_match_the_video_job_run_here(server):
    """The same question streamed (SSE) and not: one answer; usage counts what the one video job, run in this
    process on the same file, read (the video's tokens and the question's) and wrote (the answer's)."""
    from emloc import StreamContext
    from stream.config import Config
    from stream.engine import build_model
    from stream.job import answer_video
    from stream.sources import VideoFile

    seed = SEEDS[0]
    video, path = server["videos"][seed]
    question = video.question("needle")
    plain = ask(server["client"], question.text, f"file://{path}")
    parts, usage = [], None
    for chunk in ask(server["client"], question.text, f"file://{path}", stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == plain.choices[0].message.content
    assert "".join(parts).strip() == question.answer
    assert usage is not None and usage.model_dump() == plain.usage.model_dump()

    config = Config()
    adapter, settings, _ = build_model(config, None)
    context = StreamContext(adapter, settings=settings)
    [answer] = answer_video(context, VideoFile(path).frames(fps=config.model.fps), [question.text], query_aware=True)
    assert answer.text == plain.choices[0].message.content
    assert plain.usage.prompt_tokens == context.video_tokens_seen() + len(adapter.question_ids(question.text))
    assert plain.usage.completion_tokens == len(answer.token_ids)


def refused(server, url: str, status: int, *words: str, stream: bool = False, content=None) -> None:
    client = server["client"]
    with pytest.raises(openai.APIStatusError) as error:
        if content is None:
            reply = ask(client, "what digit is on screen now ?", url, stream=stream)
        else:
            reply = client.chat.completions.create(model="emloc", messages=[{"role": "user", "content": content}],
                                                   stream=stream)
        list(reply) if stream else None
    assert error.value.status_code == status, (url[:80], error.value.status_code, error.value.message)
    for word in words:
        assert word in error.value.message, (word, error.value.message)


def test_bad_videos_each_get_a_clear_error_and_the_server_goes_on(server):
    allowed, outside = server["allowed"], server["outside"]
    video, good = server["videos"][SEEDS[1]]
    escape = write_video(outside / "secret.mp4", video.frames, video.fps)
    (allowed / "link.mp4").symlink_to(escape)
    broken = allowed / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 50)
    big = allowed / "big.mp4"
    big.write_bytes(os.urandom(2 * 2**20))
    long = make_video(SEEDS[0], frames=128)  # 64 s at 2 frames/s: past the 40 s limit
    too_long = write_video(allowed / "long.mp4", long.frames, long.fps)

    for stream in (False, True):  # refused before any answer begins: the same status, streamed or not
        refused(server, str(escape), 403, str(escape), "not inside the folders this server allows", stream=stream)
    refused(server, f"{allowed}/../outside/secret.mp4", 403, "not inside the folders")
    refused(server, str(allowed / "link.mp4"), 403, "link.mp4", "not inside the folders")
    refused(server, "/etc/passwd", 403, "/etc/passwd", "not inside the folders")
    refused(server, "https://example.com/v.mp4", 403, "https:// video URLs are not fetched", "--http-video-remote")
    refused(server, "rtsp://127.0.0.1:8554/cam", 403, "rtsp:// video URLs are not fetched")
    refused(server, str(big), 413, "big.mp4", f"is {2 * 2**20} bytes; the limit is {2**20} bytes")
    refused(server, data_url(big), 413, "request body", "exceeds the limit", f"a video of up to {2**20} bytes")
    refused(server, str(too_long), 413, "the video lasts 64 s; the limit is 40 s")
    refused(server, str(broken), 422, "broken.mp4", "could not be read")
    refused(server, data_url(broken), 422, "the video sent could not be read")
    with pytest.raises(openai.APIStatusError) as error:  # where the server keeps a video sent is not said
        ask(server["client"], "what digit is on screen now ?", data_url(broken))
    assert "/tmp" not in error.value.message and "emloc-video" not in error.value.message
    refused(server, "data:video/mp4;base64,not base64!", 400, "not valid base64")
    refused(server, "data:text/plain;base64,aGk=", 415, "must hold a video")
    refused(server, "ftp://example.com/v.mp4", 400, "is not a data: URL, a file path or an http/https/rtsp URL")
    refused(server, "", 400, "input_audio",
            content=[{"type": "input_audio", "input_audio": {"data": "aGk=", "format": "wav"}},
                     {"type": "text", "text": "what is said ?"}])
    refused(server, "", 400, "only text content and video_url parts are accepted", "image_url",
            content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
                     {"type": "text", "text": "what is it ?"}])
    refused(server, "", 400, "one video_url part per question",
            content=[{"type": "video_url", "video_url": {"url": str(good)}}] * 2 + [{"type": "text", "text": "?"}])
    refused(server, "", 400, "holds a video_url but no text part",
            content=[{"type": "video_url", "video_url": {"url": str(good)}}])
    refused(server, "", 404, "not a stream here", "with a video_url part, any model answers about that video",
            content="what digit is on screen now ?")
    # nothing of that cost the server anything: it answers the next good question as before
    question = video.question("state")
    assert ask(server["client"], question.text, str(good)).choices[0].message.content.strip() == question.answer


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A server that fetches remote videos (--http-video-remote) and reads no files, and a plain HTTP server
    (Python's) that serves a folder of videos to it."""
    import functools
    import http.server
    import threading

    folder = tmp_path_factory.mktemp("remote")
    files = tmp_path_factory.mktemp("files")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    class Web(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:
            pass  # a download refused at its Content-Length closes the connection under the sender: as meant

    web = Web(("127.0.0.1", 0), functools.partial(Quiet, directory=str(files)))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    log = folder / "server.log"
    try:
        with serving(log, "--http-video-remote", "--http-video-mb", "1", "--http-video-seconds", "120",
                     client_timeout=180) as (_, client):
            yield dict(client=client, files=files, web=f"http://127.0.0.1:{web.server_port}", log=log)
    finally:
        web.shutdown()


def test_remote_videos_are_fetched_when_the_operator_allows(remote):
    video = make_video(SEEDS[2], frames=64)
    write_video(remote["files"] / "clip.mp4", video.frames, video.fps)
    (remote["files"] / "big.mp4").write_bytes(os.urandom(2 * 2**20))
    right = sum(ask(remote["client"], q.text, f"{remote['web']}/clip.mp4").choices[0].message.content.strip()
                == q.answer for q in video.questions)
    print(f"video_url over http: {right}/4 right")
    assert right >= 3
    refused(remote, f"{remote['web']}/big.mp4", 413, "big.mp4 is 2097152 bytes; the limit is 1048576 bytes")
    refused(remote, f"{remote['web']}/nothing.mp4", 422, "could not fetch", "nothing.mp4")
    refused(remote, str(remote["files"] / "clip.mp4"), 403, "reads no video files", "--http-video-dir")


RTSP_SERVER = shutil.which("rtsp-server-perl")


@pytest.mark.skipif(RTSP_SERVER is None, reason="rtsp-server-perl is not installed (apt install rtsp-server-perl)")
def test_an_rtsp_source_is_read_to_its_end(remote, tmp_path):
    """ffmpeg publishes a video to a real RTSP server (tests/test_rtsp.py's), led by 9 s of its first frame so the
    server's reader joins before the real frames; the question is answered once the source ends."""
    import numpy as np

    from .test_rtsp import FPS, LEAD, SEED, RtspServer

    video = make_video(SEED, frames=96)
    padded = np.concatenate([np.repeat(video.frames[:1], LEAD, axis=0), video.frames])
    path = write_video(tmp_path / "door.mp4", padded, FPS)
    server = RtspServer().start()
    publisher = server.publish(path)
    try:
        time.sleep(2)  # the publisher announces its stream first
        question = video.question("state")
        reply = ask(remote["client"], question.text, f"rtsp://127.0.0.1:{server.client_port}/door")
        assert publisher.wait(timeout=120) == 0
    finally:
        if publisher.poll() is None:
            publisher.kill()
        server.kill()
    print(f"video_url over RTSP: {reply.choices[0].message.content!r} (expected {question.answer!r}); {reply.video}")
    assert reply.choices[0].message.content.strip() == question.answer


def test_video_bodies_held_at_once_are_bounded(server):
    """A body past the usual 64 KiB (a video, on the chat path) takes one of 3 slots while it is read and served;
    a fourth gets 503 once it passes 64 KiB, so what such bodies hold in memory at once is bounded too."""
    import socket

    port = int(server["base"].rsplit(":", 1)[1])
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400000\r\n\r\n")
    held = []
    try:
        for _ in range(3):  # each sends 100 kB of its 400 kB and waits
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head + b" " * 100_000)
            held.append(sock)
        time.sleep(1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as fourth:
            try:
                fourth.sendall(head + b" " * 100_000)
            except OSError:  # refused while it still sent: the answer is there to read
                pass
            reply = b""
            while chunk := fourth.recv(65536):  # until the server closes the connection
                reply += chunk
            reply = reply.decode("latin-1")
        assert reply.startswith("HTTP/1.1 503") and "retry-after: 5" in reply.lower(), reply[:300]
        assert "3 request bodies of videos are in memory already (the limit is 3)" in reply, reply
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)  # their slots are given back as their connections close
    video, path = server["videos"][SEEDS[3]]
    question = video.question("state")
    assert ask(server["client"], question.text, data_url(path)).choices[0].message.content.strip() == question.answer
