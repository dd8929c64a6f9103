"""Streaming runtime figures on this machine, with the shipped tiny model.

    python benchmarks/runtime.py            # writes docs/benchmarks/runtime.{md,json}

- fold throughput: frames/s folded at the default chunk size (64 frames, the paper's
  online setting at the model's depth), query-agnostic observer, 56x56 synthetic frames;
- answer latency over the compressed cache (and over the full cache, side by side);
- MQTT round trip: the time from publishing a question on `emloc/<stream>/ask` to
  receiving its answer on `.../answer`, through a real mosquitto broker (skipped if
  mosquitto is not installed), while the stream keeps folding.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from emloc import StreamContext, load_adapter  # noqa: E402
from emloc.policies import KeepAll  # noqa: E402
from emloc.settings import videomme_online  # noqa: E402
from stream.models import DEFAULT_MODEL  # noqa: E402
from stream.questions import QuestionQueue  # noqa: E402
from stream.runtime import StreamRunner  # noqa: E402
from stream.sources import Frame  # noqa: E402
from stream.suites.synthetic import QUESTION_TYPES, make_video  # noqa: E402


def frames(seed: int, count: int, start: float = 0.0):
    video = make_video(seed, frames=count)
    return video, [Frame(image, start + i / video.fps) for i, image in enumerate(video.frames)]


def fold_throughput(adapter, settings, chunks: int) -> dict:
    context = StreamContext(adapter, settings=settings)
    runner = StreamRunner("bench", context, QuestionQueue(), [])
    _, warm = frames(5, settings.chunk_frames)
    for frame in warm:  # warm-up chunk
        runner.feed(frame)
    t0 = time.perf_counter()
    fed = 0
    for k in range(chunks):
        _, chunk = frames(100 + k, settings.chunk_frames, start=(k + 1) * settings.chunk_frames / 2)
        for frame in chunk:
            runner.feed(frame)
        fed += len(chunk)
    seconds = time.perf_counter() - t0
    records = list(context.records)[1:]
    return dict(frames=fed, seconds=round(seconds, 3), frames_per_s=round(fed / seconds, 1),
                fold_s_median=round(statistics.median(r.vision_s + r.prefill_s + r.observe_s + r.search_s
                                                      for r in records), 4),
                kept_percent=round(100 * sum(sum(r.kept) for r in records) / sum(r.chunk_tokens * len(r.kept)
                                                                                for r in records), 1),
                cache_tokens=context.cache.lengths())


def answer_latency(adapter, settings, policy, repeats: int) -> dict:
    context = StreamContext(adapter, settings=settings, policy=policy)
    video, fs = frames(7, 256)
    for k in range(0, 256, settings.chunk_frames):
        chunk = fs[k:k + settings.chunk_frames]
        context.fold(np.stack([f.image for f in chunk]),
                     timestamps=[f.time for f in chunk])
    latencies, first, decode = [], [], []
    for i in range(repeats):
        answer = context.answer(video.question(QUESTION_TYPES[i % 4]).text, max_new_tokens=4)
        latencies.append(answer.latency_s)
        first.append(answer.first_token_s)
        decode.append(answer.decode_s_per_token)
    return dict(cache_tokens=round(sum(context.cache.lengths()) / adapter.num_layers),
                latency_ms_median=round(1000 * statistics.median(latencies), 2),
                latency_ms_max=round(1000 * max(latencies), 2),
                first_token_ms_median=round(1000 * statistics.median(first), 2),
                decode_ms_per_token_median=round(1000 * statistics.median(decode), 2))


def mqtt_round_trip(adapter, settings, questions: int) -> dict | None:
    from broker import MOSQUITTO, Broker, Client

    from stream.config import MqttConfig
    from stream.mqtt import MqttBridge

    if MOSQUITTO is None:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp)).start()
        queue = QuestionQueue()
        bridge = MqttBridge(MqttConfig(port=broker.port), "bench", queue).start()
        context = StreamContext(adapter, settings=settings)
        runner = StreamRunner("bench", context, queue, [bridge], max_new_tokens=4)
        client = Client(broker.port, ["emloc/bench/answer"], name="bench-client")
        bridge.subscribed.wait(10)
        stop = threading.Event()

        def feed() -> None:  # a live stream at 2 fps, played as fast as it folds
            k = 0
            while not stop.is_set():
                _, fs = frames(200 + k, 64, start=32.0 * k)
                for frame in fs:
                    if stop.is_set():
                        return
                    runner.feed(frame)
                    time.sleep(0.005)
                k += 1

        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        time.sleep(2.0)
        trips = []
        for i in range(questions):
            before = len(client.got("emloc/bench/answer"))
            t0 = time.perf_counter()
            client.publish("emloc/bench/ask", {"id": f"b{i}", "question": "what digit is on screen now ?"})
            while len(client.got("emloc/bench/answer")) == before:
                time.sleep(0.001)
            trips.append(time.perf_counter() - t0)
            time.sleep(0.2)
        stop.set()
        thread.join()
        bridge.close()
        client.close()
        broker.stop()
    return dict(questions=questions, round_trip_ms_median=round(1000 * statistics.median(trips), 1),
                round_trip_ms_p90=round(1000 * sorted(trips)[int(0.9 * len(trips)) - 1], 1),
                round_trip_ms_max=round(1000 * max(trips), 1))


def main() -> None:
    torch.set_num_threads(2)
    adapter = load_adapter(str(DEFAULT_MODEL))
    settings = videomme_online(layer_groups=2)
    result = dict(machine="2 CPU cores, torch " + torch.__version__, model="stream/models/emloc-tiny-qwen2vl",
                  chunk_frames=settings.chunk_frames, frame_size="56x56 (4 tokens per frame pair)")
    result["fold"] = fold_throughput(adapter, settings, chunks=16)
    print("fold:", result["fold"], flush=True)
    result["answer_emloc"] = answer_latency(adapter, settings, None, repeats=20)
    result["answer_full"] = answer_latency(adapter, settings, KeepAll(), repeats=20)
    print("answer:", result["answer_emloc"], result["answer_full"], flush=True)
    result["mqtt"] = mqtt_round_trip(adapter, settings, questions=20)
    print("mqtt:", result["mqtt"], flush=True)
    out = ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime.json").write_text(json.dumps(result, indent=1) + "\n")
    f, a, b, m = result["fold"], result["answer_emloc"], result["answer_full"], result["mqtt"]
    lines = ["# Streaming runtime (shipped tiny model, CPU)", "",
             f"`python benchmarks/runtime.py` on {result['machine']}; {result['frame_size']}, "
             f"{settings.chunk_frames} frames a chunk, the paper's online setting at the model's depth.", "",
             "| figure | value |", "|---|---|",
             f"| frames folded per second | {f['frames_per_s']} ({f['frames']} frames in {f['seconds']} s) |",
             f"| median time per 64-frame chunk (vision + prefill + observer + search) | {f['fold_s_median']} s |",
             f"| tokens kept by EMLoC | {f['kept_percent']}% |",
             f"| answer latency, EMLoC cache ({a['cache_tokens']} tokens/layer) | {a['latency_ms_median']} ms median, "
             f"{a['latency_ms_max']} ms max; first token {a['first_token_ms_median']} ms, then "
             f"{a['decode_ms_per_token_median']} ms a token |",
             f"| answer latency, full cache ({b['cache_tokens']} tokens/layer) | {b['latency_ms_median']} ms median, "
             f"{b['latency_ms_max']} ms max; first token {b['first_token_ms_median']} ms, then "
             f"{b['decode_ms_per_token_median']} ms a token |"]
    if m:
        lines.append(f"| MQTT ask -> answer, while folding | {m['round_trip_ms_median']} ms median, "
                     f"{m['round_trip_ms_p90']} ms p90, {m['round_trip_ms_max']} ms max ({m['questions']} questions) |")
    lines += ["", "First token: the question's pass over the cache, bound by the cache's length (what EMLoC "
              "shrinks); each later token: one sequential pass, bound by the per-layer launch cost and reading "
              "the cache."]
    (out / "runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
