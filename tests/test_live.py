"""Live sources for real: ffmpeg streams MPEG-TS over UDP in real time (-re) to 127.0.0.1."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from stream.live import LiveSource

from .broker import Broker, Client, free_port, needs_mosquitto
from .test_cli import console_script
from .test_state import fill, small_disk  # noqa: F401 (a fixture)

# The console script imports the code under test (a worktree on PYTHONPATH), not whatever is installed.
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.environ.get("PYTHONPATH", "")}

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


def stream_to(port: int, gop: int = 10) -> subprocess.Popen:
    """testsrc at 10 frames/s, a keyframe every `gop` frames exactly (as a camera sends them)."""
    return subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc=size=56x56:rate=10",
                             "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(gop),
                             "-keyint_min", str(gop), "-sc_threshold", "0",
                             "-pix_fmt", "yuv420p", "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"])


def until(condition, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_live_source_samples_and_survives_a_restart():
    port = free_port(socket.SOCK_DGRAM)
    source = LiveSource(f"udp://127.0.0.1:{port}", fps=2, read_timeout=1.5, backoff=(0.2, 1.0)).start()
    ffmpeg = stream_to(port)
    try:
        times = []
        assert until(lambda: (f := source.get(0.1)) is not None and times.append(f.time) is None
                     and len(times) >= 6)
        assert times[:6] == pytest.approx([0.5 * k for k in range(6)], abs=0.02)
        ffmpeg.kill()
        ffmpeg.wait()
        assert until(lambda: source.state == "reconnecting", timeout=10)
        while source.get(0.1) is not None:
            pass
        ffmpeg = stream_to(port)
        later = []
        assert until(lambda: (f := source.get(0.1)) is not None and later.append(f.time) is None
                     and len(later) >= 3)
        assert min(later) > max(times) and source.connects >= 2
    finally:
        ffmpeg.kill()
        source.stop()


def first_frame_within(source: LiveSource, seconds: float) -> float | None:
    """Seconds until the source gives a frame, or None if none came within `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if source.get(0.1) is not None:
            return time.monotonic() - started
    return None


@pytest.mark.slow
def test_joined_mid_gop_and_restarted_the_first_frame_comes_with_the_next_keyframe():
    # A keyframe every 6 s, joined just after one: every packet until the next is undecodable and must be
    # skipped, not a reason to reconnect and join mid-GOP again; and FFmpeg's probe of the stream, which waits
    # for a keyframe's parameters up to 7 s of an MPEG-TS stream by default, must not outlast the 5 s open
    # timeout (cut off, it leaves the connection unusable: a reconnect, mid-GOP again).
    port = free_port(socket.SOCK_DGRAM)
    gop_s = 6
    ffmpeg = stream_to(port, gop=10 * gop_s)
    source = None
    try:
        time.sleep(0.5)
        source = LiveSource(f"udp://127.0.0.1:{port}", fps=2, read_timeout=1.5).start()
        assert until(lambda: source.awaiting_keyframe and source.skipped_packets > 0, timeout=gop_s), \
            "connected mid-GOP, it skips what it cannot decode (the status says so)"
        waited = first_frame_within(source, gop_s + 5)
        assert waited is not None, f"no frame within {gop_s + 5} s of joining ({source.last_error})"
        assert not source.awaiting_keyframe
        assert source.connects == 1, f"reconnected {source.connects - 1} times before the first frame"
        ffmpeg.kill()
        ffmpeg.wait()
        assert until(lambda: source.state == "reconnecting", timeout=10)
        while source.get(0.1) is not None:
            pass
        ffmpeg = stream_to(port, gop=10 * gop_s)
        waited = first_frame_within(source, gop_s + 5)
        assert waited is not None, f"no frame within {gop_s + 5} s of the restart ({source.last_error})"
    finally:
        ffmpeg.kill()
        if source is not None:
            source.stop()


@pytest.mark.slow
@needs_mosquitto
def test_live_cli_answers_over_mqtt_and_stops_cleanly(tmp_path):
    broker = Broker(tmp_path).start()
    config = tmp_path / "live.yaml"
    config.write_text("emloc:\n  preset: videomme_online\n  layer_group_size: 2\n  chunk_frames: 8\n")
    port = free_port(socket.SOCK_DGRAM)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "file1", "question": "what digit is on screen now ?", "at": 3}\n')
    client = Client(broker.port, ["emloc/door/answer", "emloc/door/status", "emloc/door/error"], name="live")
    ffmpeg = stream_to(port)
    live = subprocess.Popen([console_script(), "live", f"udp://127.0.0.1:{port}", "--config", str(config),
                             "--stream-id", "door", "--mqtt", f"127.0.0.1:{broker.port}", "--status-every", "0.5",
                             "--questions", str(questions), "--stdin",
                             "--max-new-tokens", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        status = lambda: client.got("emloc/door/status")[-1] if client.got("emloc/door/status") else {}  # noqa: E731
        assert until(lambda: status().get("chunks_folded", 0) >= 1, timeout=90), status()
        client.publish("emloc/door/ask", {"id": "mid", "question": "what digit is on screen now ?"})
        client.publish("emloc/door/ask", b"{broken")
        assert until(lambda: client.got("emloc/door/answer"), timeout=30)
        assert until(lambda: {"mid", "file1"} <= {a["question_id"] for a in client.got("emloc/door/answer")})
        answer = next(a for a in client.got("emloc/door/answer") if a["question_id"] == "mid")
        assert answer["time_span"][1] > 0
        assert "not JSON" in client.got("emloc/door/error")[0]["error"]
        live.stdin.write("how many times did a star appear ?\n")  # a question typed at the terminal
        live.stdin.flush()
        assert until(lambda: any(a["question"] == "how many times did a star appear ?"
                                 for a in client.got("emloc/door/answer")), timeout=30)
        folded = status()["chunks_folded"]
        ffmpeg.kill()
        ffmpeg.wait()
        assert until(lambda: status().get("state") == "reconnecting", timeout=20), status()
        ffmpeg = stream_to(port)
        assert until(lambda: status().get("chunks_folded", 0) >= folded + 2, timeout=60), status()
        client.publish("emloc/door/ask", {"id": "late", "question": "what colour was the star ?", "at": 3000})
        time.sleep(1.0)
        live.send_signal(signal.SIGINT)  # finishes: folds what is left, answers what waits, exits 0
        out, err = live.communicate(timeout=60)
        assert live.returncode == 0, err
        assert "stopped door:" in out
        assert until(lambda: len(client.got("emloc/door/answer")) == 4), client.got("emloc/door/answer")
        ids = [a["question_id"] for a in client.got("emloc/door/answer")]
        assert {"mid", "late", "file1"} <= set(ids) and len(set(ids)) == 4, "each question answered exactly once"
    finally:
        ffmpeg.kill()
        if live.poll() is None:
            live.kill()
        client.close()
        broker.stop()


@pytest.mark.slow
@needs_mosquitto
def test_serve_two_streams_one_model_one_source_killed(tmp_path):
    broker = Broker(tmp_path).start()
    ports = [free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)]
    config = tmp_path / "site.yaml"
    config.write_text(
        "emloc:\n  preset: videomme_online\n  layer_group_size: 2\n  chunk_frames: 8\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {broker.port}\n"
        "streams:\n"
        f"  - id: gate\n    source: udp://127.0.0.1:{ports[0]}\n    standing: ['what digit is on screen now ?']\n"
        f"  - id: yard\n    source: udp://127.0.0.1:{ports[1]}\n    jsonl: {tmp_path}/yard.jsonl\n")
    client = Client(broker.port, ["emloc/+/status", "emloc/+/answer"], name="site")
    sources = [stream_to(port) for port in ports]
    serve = subprocess.Popen([console_script(), "serve", "--config", str(config), "--status-every", "0.5",
                              "--max-new-tokens", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV)
    try:
        def status(stream):
            got = client.got(f"emloc/{stream}/status")
            return got[-1] if got else {}
        assert until(lambda: status("gate").get("chunks_folded", 0) >= 1 and status("yard").get("chunks_folded", 0)
                     >= 1, timeout=90), (status("gate"), status("yard"))
        sources[1].kill()  # the yard camera dies
        sources[1].wait()
        assert until(lambda: status("yard").get("state") == "reconnecting", timeout=20), status("yard")
        folded = status("gate")["chunks_folded"]
        assert until(lambda: status("gate").get("chunks_folded", 0) >= folded + 2, timeout=60), status("gate")
        assert status("gate")["state"] == "running" and status("yard")["state"] == "reconnecting"
        assert len(client.got("emloc/gate/answer")) >= 3  # the standing question, after every chunk
        client.publish("emloc/yard/ask", {"id": "y1", "question": "what colour was the star ?"})
        assert until(lambda: client.got("emloc/yard/answer"), timeout=30)  # a stream without a source still answers
        serve.send_signal(signal.SIGINT)
        out, err = serve.communicate(timeout=60)
        assert serve.returncode == 0, err
        assert "stopped gate:" in out and "stopped yard:" in out
        assert '"question_id": "y1"' in (tmp_path / "yard.jsonl").read_text()
    finally:
        for s in sources:
            s.kill()
        if serve.poll() is None:
            serve.kill()
        client.close()
        broker.stop()


@pytest.mark.slow
def test_live_state_is_saved_on_exit_and_resumed(tmp_path):
    config = tmp_path / "live.yaml"
    config.write_text("emloc:\n  preset: videomme_online\n  layer_group_size: 2\n  chunk_frames: 8\n"
                      "  token_budget: 40\n")
    port = free_port(socket.SOCK_DGRAM)
    state = tmp_path / "state"
    command = [console_script(), "live", f"udp://127.0.0.1:{port}", "--config", str(config), "--stream-id", "door",
               "--state", str(state), "--standing", "what digit is on screen now ?", "--every", "100",
               "--duration", "9", "--max-new-tokens", "2"]
    env = ENV
    ffmpeg = stream_to(port)
    try:
        first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert first.returncode == 0, first.stderr
        manifest = json.loads((state / "manifest.json").read_text())
        saved = manifest["stream"]
        assert saved["stream_id"] == "door" and saved["last_time"] > 0
        assert [q["question"] for q in saved["questions"]] == ["what digit is on screen now ?"]
        chunks = manifest["context"]["chunks_folded"]
        assert chunks >= 1
        second = subprocess.run(command[:-4] + ["--duration", "6", "--max-new-tokens", "2"], capture_output=True,
                                text=True, env=env, timeout=120)
        assert second.returncode == 0, second.stderr
        assert f"resumed from {state}: {chunks} chunks folded" in second.stdout
        assert "1 questions restored" in second.stdout
        after = json.loads((state / "manifest.json").read_text())
        assert len(after["stream"]["questions"]) == 1, "the standing question given again is not doubled"
        assert after["context"]["chunks_folded"] > chunks and after["stream"]["last_time"] > saved["last_time"]
        other = subprocess.run([*command[:5], "--stream-id", "gate", "--state", str(state), "--duration", "1"],
                               capture_output=True, text=True, env=env, timeout=120)
        assert other.returncode == 2 and "belongs to stream 'door'" in other.stderr
    finally:
        ffmpeg.kill()


@pytest.mark.slow
def test_live_on_a_full_disk_keeps_folding_says_state_not_saved_and_exits_1(tmp_path, small_disk, capsys):  # noqa: F811
    from stream.cli import main

    config = tmp_path / "live.yaml"
    config.write_text("emloc:\n  preset: reference_code\n  chunk_frames: 4\n")
    port = free_port(socket.SOCK_DGRAM)
    (small_disk / "state").mkdir()
    fill(small_disk)
    ffmpeg = stream_to(port)
    try:
        code = main(["live", f"udp://127.0.0.1:{port}", "--model", "builtin:random", "--config", str(config),
                     "--state", str(small_disk / "state"), "--duration", "6", "--max-new-tokens", "1",
                     "--status-every", "100"])
    finally:
        ffmpeg.kill()
    out, err = capsys.readouterr()
    chunks = int(re.search(r"stopped cam: \d+ frames, (\d+) chunks", out).group(1))
    assert code == 1 and chunks >= 2, (out, err)
    assert "fold failed" not in err and "Traceback" not in err
    not_saved = [line for line in err.splitlines() if "state not saved: No space left on device" in line]
    assert len(not_saved) == 2, err  # once when it first failed (not every chunk), once at exit
    assert list((small_disk / "state").iterdir()) == []
