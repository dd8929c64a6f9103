"""Realtime sessions: how long a frame sent over WebSocket takes to be in the cache, and ask-to-answer.

    python benchmarks/realtime.py            # writes docs/benchmarks/realtime.{md,json}

`emloc-stream live --http` (a subprocess, as deployed; the shipped tiny model, 16-frame chunks) takes a
realtime session (`/v1/realtime`) from this script, which sends a synthetic video's frames as JPEG at
2 frames a second (what the page's "use my camera" sends), with their timestamps, and asks a one-off
question over the same socket every `--ask-every` seconds. Measured at the client:

- frame -> cache: from sending a frame to the `input_video_frame.folded` event of the chunk holding it.
  A frame waits for its chunk to fill (16 frames at 2/s: up to 7.5 s), then for the fold; both are
  given apart: "chunk-completing frame -> folded" is the fold and delivery alone.
- ask -> answer: from sending `response.create` to its `response.done` (the model's own answer time,
  `latency_s` of the answer, inside it).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from stream.suites.synthetic import make_video  # noqa: E402

QUESTION = "what colour was the triangle ?"
CONFIG = "emloc:\n  preset: videomme_online\n  layer_group_size: 2\n  chunk_frames: 16\n"


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg(image) -> str:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return base64.b64encode(out.getvalue()).decode()


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return dict(n=len(values), median=round(statistics.median(values), 1),
                p90=round(values[min(len(values) - 1, int(0.9 * len(values)))], 1), max=round(values[-1], 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128, help="frames sent (2 a second)")
    parser.add_argument("--ask-every", type=float, default=3.0, help="seconds between questions")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "realtime")
    args = parser.parse_args()
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"realtime-bench-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "live.yaml").write_text(CONFIG)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "stream", "live", f"udp://127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                               "--config", str(folder / "live.yaml"), "--stream-id", "cam", "--http",
                               f"127.0.0.1:{port}", "--max-new-tokens", "4", "--status-every", "5"], cwd=ROOT,
                              stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        video = make_video(3_000_100, frames=args.frames)  # the tests' video: the model knows its needle
        frames = [jpeg(image) for image in video.frames]
        events: list[tuple[float, dict]] = []
        with connect(f"ws://127.0.0.1:{port}/v1/realtime?model=bench", max_size=None) as ws:
            def read() -> None:
                try:
                    for message in ws:
                        events.append((time.perf_counter(), json.loads(message)))
                except Exception:  # the socket closed at the end
                    pass
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            sent, asked = [], {}
            start, next_ask = time.perf_counter(), 8.0
            for i, frame in enumerate(frames):
                due = start + i / video.fps
                while time.perf_counter() < due:
                    if time.perf_counter() - start >= next_ask:
                        event_id = f"ask-{len(asked)}"
                        asked[event_id] = time.perf_counter()
                        ws.send(json.dumps({"type": "response.create", "event_id": event_id,
                                            "response": {"question": QUESTION, "id": event_id}}))
                        next_ask += args.ask_every
                    time.sleep(0.005)
                sent.append(time.perf_counter())
                ws.send(json.dumps({"type": "input_video_frame.append", "image": frame, "timestamp": i / video.fps}))
            chunks = args.frames // 16
            wait_until = time.time() + 120
            while time.time() < wait_until and (
                    sum(e["type"] == "input_video_frame.folded" for _, e in events) < chunks
                    or sum(e["type"] == "response.done" for _, e in events) < len(asked)):
                time.sleep(0.1)
            status = httpx.get(f"{base}/streams/bench").json()
        folded = [(t, e) for t, e in events if e["type"] == "input_video_frame.folded"]
        to_cache, completing = [], []
        for k, (t, _) in enumerate(folded):
            for i in range(16 * k, 16 * k + 16):
                to_cache.append(1000 * (t - sent[i]))
            completing.append(1000 * (t - sent[16 * k + 15]))
        done = {e["response"]["id"]: t for t, e in events if e["type"] == "response.done"}
        texts = {e["response_id"]: e for t, e in events if e["type"] == "response.output_text.done"}
        ask_answer = [1000 * (done[q] - t) for q, t in asked.items() if q in done]
        model_time = [1000 * texts[q]["latency_s"] for q in asked if q in texts]
        right = sum(texts[q]["text"] == video.question("needle").answer for q in asked if q in texts
                    and texts[q]["time_span"][1] >= next(e.step for e in video.events if e.shape == "triangle") + 1)
        late = [q for q in asked if q in texts
                and texts[q]["time_span"][1] >= next(e.step for e in video.events if e.shape == "triangle") + 1]
    finally:
        server.kill()
        server.wait()
    results = dict(frames=args.frames, chunks_folded=len(folded), frames_dropped=status["frames_dropped"],
                   frame_to_cache_ms=summary(to_cache), chunk_completing_frame_to_cache_ms=summary(completing),
                   ask_to_answer_ms=summary(ask_answer), model_answer_ms=summary(model_time),
                   needle_right=f"{right}/{len(late)}",
                   machine=dict(cpus=os.cpu_count(), python=platform.python_version(),
                                load=round(os.getloadavg()[0], 1)))
    rows = [("a frame sent -> its chunk's `input_video_frame.folded`", results["frame_to_cache_ms"]),
            ("the chunk-completing frame -> `input_video_frame.folded` (fold + delivery)",
             results["chunk_completing_frame_to_cache_ms"]),
            ("`response.create` -> its `response.done`", results["ask_to_answer_ms"]),
            ("(the model's own answer time, inside the above)", results["model_answer_ms"])]
    table = "\n".join(f"| {name} | {r['n']} | {r['median']} ms | {r['p90']} ms | {r['max']} ms |" for name, r in rows)
    text = f"""# Realtime sessions: frame to cache, ask to answer (shipped tiny model, CPU)

`python benchmarks/realtime.py` on {os.cpu_count()} CPU cores, a machine shared with other jobs (load average
{results['machine']['load']} at the end): absolute times are inflated.

`live --http` in its own process; one realtime session (`/v1/realtime`) sends a {args.frames}-frame synthetic
video as JPEG at 2 frames a second (what the page's camera sends) with its timestamps, and asks a one-off
question over the same socket every {args.ask_every:g} s from 8 s on. {len(folded)} chunks of 16 frames folded,
{status['frames_dropped']} frames dropped; the needle question was answered right {right} times of the
{len(late)} asked once the needle had been sent.

| measured at the client | n | median | p90 | max |
|---|---|---|---|---|
{table}

A frame is in the cache once its chunk is folded: at 2 frames a second a 16-frame chunk fills in 8 s, so
the first line is mostly that wait (half a chunk on average); the second line is what the server adds.
Questions are answered over the cache and the frames not yet folded, so an answer never waits for a chunk.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
