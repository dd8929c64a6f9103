"""RTSP for real: ffmpeg publishes a synthetic video to a real RTSP server (Debian's rtsp-server-perl), `live`
reads it from there, and the server is killed and restarted mid-stream.

The video (seed 9,400,003: no event in its first, last or middle two steps) is cut in two at 24 s. The first part
is published, the server killed while it still streams (its tail repeats its last frame) and started again, and
the second part published to it. Each part begins with 9 s (of wall-clock time) of its first frame, so the reader,
which retries a missing stream with backoff up to 8 s, joins before the real frames; repeated frames add no event
and change no digit. The questions are scheduled past the end and answered when `live` stops, over everything it
saw, and checked against the video's ground truth.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from stream.sources import write_video
from stream.suites.synthetic import QUESTION_TYPES, make_video

from .broker import Broker, Client, free_port, needs_mosquitto
from .test_end_to_end import popen, until

RTSP_SERVER = shutil.which("rtsp-server-perl")
SEED, FRAMES, FPS, SPLIT = 9_400_003, 96, 2.0, 48  # frames; the second part starts at frame 48 (step 24)
READRATE = 2  # published at twice its pace
LEAD = round(9 * FPS * READRATE)  # frames of the first image before each part: 9 s of wall-clock time
TAIL = round(8 * FPS * READRATE)  # frames of the last image after each part (the server dies during the first's)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed (apt install ffmpeg)"),
              pytest.mark.skipif(RTSP_SERVER is None,
                                 reason="rtsp-server-perl is not installed (apt install rtsp-server-perl)"),
              needs_mosquitto]


class RtspServer:
    """rtsp-server-perl: publishers (ffmpeg) on one port, readers on another, both on 127.0.0.1; RTP over UDP (it
    has no TCP interleaving: a reader gets the stream with FFmpeg's default transport, as from most cameras)."""

    def __init__(self) -> None:
        self.client_port, self.source_port, self.rtp_port = free_port(), free_port(), free_port()
        self.process = None

    def start(self) -> RtspServer:
        self.process = subprocess.Popen([RTSP_SERVER, "--clientport", str(self.client_port), "--serverport",
                                         str(self.source_port), "--client_listen_address", "127.0.0.1",
                                         "--source_listen_address", "127.0.0.1", "--rtp_start_port",
                                         str(self.rtp_port), "--loglevel", "1"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until(lambda: _listening(self.source_port) and _listening(self.client_port), 30, "the RTSP server")
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def publish(self, path) -> subprocess.Popen:
        return subprocess.Popen(["ffmpeg", "-v", "error", "-readrate", str(READRATE), "-i", str(path), "-c:v",
                                 "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "4",
                                 "-pix_fmt", "yuv420p", "-f", "rtsp",
                                 f"rtsp://127.0.0.1:{self.source_port}/door"],
                                stderr=subprocess.DEVNULL)  # "Broken pipe" when its server is killed: the point


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_live_reads_rtsp_through_a_server_restart(tmp_path):
    video = make_video(SEED, frames=FRAMES)
    steps = {event.step for event in video.events}
    assert not steps & {0, SPLIT // 2 - 1, SPLIT // 2, FRAMES // 2 - 1}, "repeated frames must not repeat an event"
    parts = []
    for k, frames in enumerate((video.frames[:SPLIT], video.frames[SPLIT:])):
        padded = np.concatenate([np.repeat(frames[:1], LEAD, axis=0), frames, np.repeat(frames[-1:], TAIL, axis=0)])
        parts.append(write_video(tmp_path / f"part{k}.mp4", padded, FPS))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": k, "question": video.question(k).text, "at": 3000}) + "\n"
                                 for k in QUESTION_TYPES))
    broker = Broker(tmp_path).start()
    client = Client(broker.port, ["emloc/door/answer", "emloc/door/status"], name="rtsp-test")
    server = RtspServer().start()
    live = popen("live", f"rtsp://127.0.0.1:{server.client_port}/door", "--stream-id", "door", "--mqtt",
                 f"127.0.0.1:{broker.port}", "--questions", str(questions), "--buffer", "256", "--status-every", "0.3",
                 "--max-new-tokens", "2")
    publisher = None
    states = []

    def status() -> dict:
        got = client.got("emloc/door/status")
        if got and (not states or states[-1] != got[-1]["state"]):
            states.append(got[-1]["state"])
        return got[-1] if got else {}

    try:
        until(lambda: status(), 120, "the stream's first status")
        publisher = server.publish(parts[0])
        started = time.time()
        until(lambda: status().get("state") == "running", 60, "the reader to join the first part")
        time.sleep(max(0.0, started + (LEAD + SPLIT) / (FPS * READRATE) + 3 - time.time()))  # into its tail
        assert publisher.poll() is None, "the first part must still stream when its server dies"
        server.kill()
        publisher.wait(timeout=30)
        until(lambda: status().get("state") == "reconnecting", 30, "the reader to notice")
        server.start()
        publisher = server.publish(parts[1])
        until(lambda: status().get("state") == "running", 60, "the reader to join the second part")
        assert publisher.wait(timeout=120) == 0, "the second part was published whole"
        until(lambda: status().get("state") == "reconnecting", 30, "the reader to read the second part to its end")
        live.send_signal(signal.SIGINT)  # folds what is left, answers the waiting questions
        out, err = live.communicate(timeout=300)
        assert live.returncode == 0, err
    finally:
        for process in (publisher, live):
            if process is not None and process.poll() is None:
                process.kill()
        if server.process.poll() is None:
            server.kill()
        client.close()
        broker.stop()
    assert states.count("running") >= 2 and states.count("reconnecting") >= 2, states  # joined, lost, joined, ended
    assert client.got("emloc/door/status")[-1]["frames_dropped"] == 0
    answers = {a["question_id"]: a["answer"].strip() for a in client.got("emloc/door/answer")}
    expected = {k: video.question(k).answer for k in QUESTION_TYPES}
    right = sum(answers.get(k) == expected[k] for k in QUESTION_TYPES)
    print(f"\nlive over RTSP through a server restart: {right}/4 right: {answers} (expected {expected})")
    assert right >= 3, (answers, expected)
