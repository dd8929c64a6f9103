"""What the HTTP side costs and how fast it answers, with the shipped tiny model on this machine.

    python benchmarks/http_api.py            # writes docs/benchmarks/http.{md,json} and docs/web-page.png

1. Ask-to-answer time while a stream folds: `emloc-stream live --http` (a subprocess, as deployed)
   watches a synthetic video streamed over UDP by ffmpeg at 2x real time (a 16-frame chunk folded
   every 4 s); questions are asked over REST and the answer is read (a) by polling
   `GET /answers?since=`, (b) from the `/events` server-sent events, (c) as the reply of
   `POST /v1/chat/completions`. The page is open in headless Chromium meanwhile; its screenshot
   is saved.
2. Fold throughput with and without the server: one process folds a 2048-frame file read as a
   live source (as fast as it decodes, nothing dropped) (a) without HTTP, (b) with the HTTP server,
   (c) with the server and the page open in Chromium; runs interleaved, median of several.

(Not named http.py: as a script it would shadow the standard library's `http` package.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from stream.sources import write_video  # noqa: E402
from stream.suites.synthetic import make_video  # noqa: E402

QUESTION = "what colour was the triangle ?"


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser(url: str):
    """Headless Debian Chromium on `url`, or None when it is not installed."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,860"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.get(url)
    return driver


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return dict(n=len(values), median_ms=round(1000 * statistics.median(values), 1),
                p90_ms=round(1000 * values[int(0.9 * (len(values) - 1))], 1), max_ms=round(1000 * values[-1], 1))


class Events(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.arrived, self.ready = url, {}, threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=None) as response:
                self.ready.set()
                event = ""
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "answer":
                        answer = json.loads(line[5:])
                        self.arrived[answer["question_id"]] = (time.perf_counter(), time.time() - answer["wall_time"])
        except httpx.HTTPError:
            pass


def ask_to_answer(folder: Path, questions: int, screenshot: Path) -> dict:
    video = make_video(2_000_500, frames=2400)  # 20 minutes of video: it folds for the whole measurement
    path = write_video(folder / "long.mp4", video.frames, video.fps)
    config = folder / "live.yaml"
    config.write_text("emloc:\n  preset: videomme_online\n  layer_group_size: 2\n  chunk_frames: 16\n"
                      "  token_budget: 64\n")
    udp, port = free_port(socket.SOCK_DGRAM), free_port()
    server = subprocess.Popen([sys.executable, "-m", "stream", "live", f"udp://127.0.0.1:{udp}", "--config",
                               str(config), "--stream-id", "cam", "--http", f"127.0.0.1:{port}",
                               "--standing", "what digit is on screen now ?", "--every", "2",
                               "--max-new-tokens", "4", "--status-every", "30", "--buffer", "64",
                               "--http-rate", "1000"],  # it polls /answers every 5 ms: past the default rate
                              cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ffmpeg = page = None
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        ffmpeg = subprocess.Popen(["ffmpeg", "-v", "error", "-readrate", "2", "-i", str(path), "-c", "copy", "-f",
                                   "mpegts", f"udp://127.0.0.1:{udp}?pkt_size=1316"])
        client = httpx.Client(base_url=base, timeout=60)
        while client.get("/streams/cam").json()["chunks_folded"] < 2:
            time.sleep(0.2)
        page = browser(base + "/")
        events = Events(base + "/streams/cam/events")
        events.start()
        events.ready.wait(10)
        rest, sse, chat, model, rest_delivery, sse_delivery = [], [], [], [], [], []
        for i in range(questions):
            since = client.get("/streams/cam/answers", params={"limit": 1}).json()["newest"]
            start = time.perf_counter()
            qid = client.post("/streams/cam/questions", json={"question": QUESTION}).json()["id"]
            found = None
            while found is None:
                found = next((a for a in client.get("/streams/cam/answers", params={"since": since}).json()["answers"]
                              if a["question_id"] == qid), None)
                if found is None:
                    time.sleep(0.005)
            rest.append(time.perf_counter() - start)
            rest_delivery.append(time.time() - found["wall_time"])
            model.append(found["latency_s"])
            while qid not in events.arrived:
                time.sleep(0.002)
            sse.append(events.arrived[qid][0] - start)
            sse_delivery.append(events.arrived[qid][1])
            start = time.perf_counter()
            reply = client.post("/v1/chat/completions", json={"model": "cam", "messages": [
                {"role": "user", "content": QUESTION}]}).json()
            assert reply["choices"][0]["message"]["content"]
            chat.append(time.perf_counter() - start)
            time.sleep(0.3 + 0.1 * (i % 5))  # spread the questions over the fold cycle
        status = client.get("/streams/cam").json()
        if page is not None:
            time.sleep(2)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.save_screenshot(str(screenshot))
        return dict(rest_poll=summary(rest), sse=summary(sse), openai=summary(chat), model_answer=summary(model),
                    rest_delivery=summary(rest_delivery), sse_delivery=summary(sse_delivery),
                    chunks_folded=status["chunks_folded"], frames_dropped=status["frames_dropped"],
                    page_open=page is not None)
    finally:
        if page is not None:
            page.quit()
        if ffmpeg is not None:
            ffmpeg.kill()
        server.kill()


def fold_throughput(folder: Path, frames: int, repeats: int) -> dict:
    import torch

    from stream.config import StreamConfig, load_config
    from stream.engine import build_model
    from stream.http import HttpServer
    from stream.service import LiveStream, serve

    video = make_video(2_000_501, frames=frames)
    path = write_video(folder / "fold.mp4", video.frames, video.fps)
    config_file = folder / "fold.yaml"
    config_file.write_text("emloc:\n  preset: videomme_online\n  layer_group_size: 2\n  chunk_frames: 64\n"
                           "  token_budget: 128\n")
    config = load_config(config_file)
    adapter, settings, _ = build_model(config, None)

    class Clock:
        def __init__(self):
            self.times, self.frames = [], 0

        def on_fold(self, record):
            self.times.append((time.perf_counter(), time.process_time()))
            self.frames += record.frames

    def once(mode: str) -> float:
        spec = StreamConfig(id="cam", source=str(path), buffer=frames + 64)
        stream = LiveStream(spec, adapter, settings, fps=2.0, console=False)
        stream.source.backoff = (1e6, 1e6)  # a file ends: do not read it again (a live source would reconnect)
        clock = Clock()
        stream.subscribe(clock)
        http = page = None
        if mode != "none":
            http = HttpServer([stream], f"127.0.0.1:{free_port()}").start()
            if mode == "page":
                page = browser(http.url + "/")
                time.sleep(2)  # the page has loaded and polls
        stop = threading.Event()
        runner = threading.Thread(target=serve, args=([stream], stop), kwargs=dict(status_every=1e9), daemon=True)
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            runner.start()
            while clock.frames < frames - 64 and runner.is_alive():
                time.sleep(0.01)
            stop.set()
            runner.join()
        if page is not None:
            page.quit()
        if http is not None:
            http.stop()
        folded = clock.frames - 64  # from the end of the first fold to the end of the last
        (wall0, cpu0), (wall1, cpu1) = clock.times[0], clock.times[-1]
        return folded / (wall1 - wall0), folded / (cpu1 - cpu0)

    modes = ["none", "http", "page"] if shutil.which("chromium") else ["none", "http"]
    torch.set_num_threads(1)  # one compute thread: CPU seconds then measure work, not spinning
    runs = {mode: [] for mode in modes}
    once("none")  # warm-up
    for _ in range(repeats):
        for mode in modes:
            runs[mode].append(once(mode))
    wall = {mode: statistics.median(r[0] for r in v) for mode, v in runs.items()}
    cpu = {mode: statistics.median(r[1] for r in v) for mode, v in runs.items()}
    return dict(frames=frames, chunk_frames=64, repeats=repeats,
                frames_per_s={m: round(v, 1) for m, v in wall.items()},
                frames_per_cpu_s={m: round(v, 1) for m, v in cpu.items()},
                runs={m: [[round(x, 1) for x in r] for r in v] for m, v in runs.items()},
                overhead_pct={m: round(100 * (1 - wall[m] / wall["none"]), 1) for m in modes if m != "none"},
                cpu_overhead_pct={m: round(100 * (1 - cpu[m] / cpu["none"]), 1) for m in modes if m != "none"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "web-page.png")
    args = parser.parse_args()
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        asking = ask_to_answer(folder, args.questions, args.screenshot)
        print("ask -> answer:", json.dumps(asking), flush=True)
        folding = fold_throughput(folder, args.frames, args.repeats)
        print("fold throughput:", json.dumps(folding), flush=True)
    load = [round(x, 1) for x in os.getloadavg()]
    result = dict(machine=f"{os.cpu_count()} CPU cores, torch {torch.__version__}", load_average=load,
                  ask_to_answer=asking,
                  fold_throughput=folding, command="python benchmarks/http_api.py")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http.json").write_text(json.dumps(result, indent=1) + "\n")
    a, f = asking, folding
    lines = [
        "# HTTP side: ask-to-answer time and the server's cost (shipped tiny model, CPU)", "",
        f"`python benchmarks/http_api.py` on {result['machine']}, a machine shared with other jobs (load average "
        f"{load[0]} at the end): absolute times are inflated, and the comparisons are medians of interleaved "
        "runs.", "",
        "## Ask to answer, while the stream folds", "",
        f"`live --http` in its own process, fed a synthetic video over UDP at 2x real time (a 16-frame chunk "
        f"every 4 s, {a['chunks_folded']} chunks folded, {a['frames_dropped']} frames dropped), one standing "
        f"question every 2 chunks, the page open in headless Chromium: {'yes' if a['page_open'] else 'no'}. "
        f"{a['rest_poll']['n']} one-off questions, each asked over REST and once more over the OpenAI endpoint.", "",
        "| answer read by | median | p90 | max |", "|---|---|---|---|",
        *[f"| {name} | {a[key]['median_ms']} ms | {a[key]['p90_ms']} ms | {a[key]['max_ms']} ms |" for name, key in (
            ("REST: POST the question, poll `GET /answers?since=` every 5 ms", "rest_poll"),
            ("SSE: POST the question, the `answer` event on `/events`", "sse"),
            ("OpenAI: `POST /v1/chat/completions` until its reply", "openai"),
            ("(the model's own answer time, inside the above)", "model_answer"),
            ("delivery alone, REST: the answer made -> the poll that sees it", "rest_delivery"),
            ("delivery alone, SSE: the answer made -> its event at the client", "sse_delivery"))], "",
        "Most of the wait is the serving loop's: between frames it waits up to 0.2 s for the next one before "
        "it answers what is due, and a question asked during a fold waits for the fold.", "",
        "## Fold throughput with and without the server", "",
        f"One process folds a {f['frames']}-frame synthetic file read as a live source (decoded as fast as it "
        f"goes, nothing dropped), {f['chunk_frames']}-frame chunks, budget 128 tokens/layer; median of "
        f"{f['repeats']} interleaved runs each.", "",
        "| setting | frames folded per CPU second (all the process's threads) | CPU overhead | frames folded "
        "per wall second | wall overhead |", "|---|---|---|---|---|",
        f"| no HTTP server | {f['frames_per_cpu_s']['none']} | - | {f['frames_per_s']['none']} | - |",
        *[f"| {name} | {f['frames_per_cpu_s'][m]} | {f['cpu_overhead_pct'][m]}% | {f['frames_per_s'][m]} | "
          f"{f['overhead_pct'][m]}% |" for m, name in (("http", "HTTP server, no client"),
                                                       ("page", "HTTP server, the page open in Chromium"))
          if m in f["frames_per_s"]],
        "", "CPU seconds are those of the folding process (the serving loop, the source reader and the "
        "HTTP server's thread; torch on one thread), so they count what serving the page costs and not "
        "what other jobs on the machine take; wall-clock figures on this shared machine mostly measure the "
        "other jobs. The page polls the newest frame every second and follows the event stream (a status "
        "event a second); Chromium's own CPU is its process's, not counted.", ""]
    (args.out / "http.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
