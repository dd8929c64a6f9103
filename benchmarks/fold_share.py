"""Folding's share under a flood of questions: `live --http` with the shipped model, one client flooding.

    python benchmarks/fold_share.py                  # writes docs/benchmarks/fold_share.{md,json}
    python benchmarks/fold_share.py --tree /tmp/before --suffix=-before   # an older checkout's runtime

`emloc-stream live --http` runs as deployed (its own process), fed a synthetic video over UDP by ffmpeg at
--readrate times real time. First --quiet-s seconds without questions (the unloaded folding rate), then
--flood-s seconds in which one client (from 127.0.0.2: the server tells clients apart by address) keeps
the one-off queue full: --flooders threads post questions without pause (a refused one is posted again
after 50 ms), half of them as OpenAI chat requests they abandon after 0.5 s (a client that disconnects).
Meanwhile another client (127.0.0.3) asks one question every --other-every seconds and waits for its answer.
Figures: chunks folded per second unloaded and flooded (target: flooded >= 80% of unloaded), frames
dropped, lag, and the other client's ask-to-answer time against the model's time per answer (target: within
2 answer times).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
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


def client_from(address: str, base: str, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=timeout, transport=httpx.HTTPTransport(local_address=address))


def status(client: httpx.Client) -> dict:
    return client.get("/streams/cam").json()


def rate(before: dict, after: dict, seconds: float) -> dict:
    return dict(seconds=round(seconds, 1), chunks=after["chunks_folded"] - before["chunks_folded"],
                chunks_per_s=round((after["chunks_folded"] - before["chunks_folded"]) / seconds, 3),
                frames_dropped=after["frames_dropped"] - before["frames_dropped"], lag_s_at_end=after["lag_s"],
                answers=after["answers"] - before["answers"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet-s", type=float, default=45.0)
    parser.add_argument("--flood-s", type=float, default=90.0)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--other-every", type=float, default=5.0)
    parser.add_argument("--readrate", type=float, default=2.0, help="the source plays at this many times real time")
    parser.add_argument("--tree", type=Path, help="checkout whose code runs (e.g. an older commit, for 'before')")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    tree = args.tree or ROOT
    folder = Path(tempfile.mkdtemp(prefix="fold-share-"))
    minutes = (args.quiet_s + args.flood_s + 60) * args.readrate / 60
    video = make_video(2_000_777, frames=int(minutes * 60 * 2))
    path = write_video(folder / "long.mp4", video.frames, video.fps)
    config = folder / "live.yaml"
    config.write_text("emloc:\n  preset: videomme_online\n  layer_group_size: 2\n  chunk_frames: 16\n"
                      "  token_budget: 64\n")
    udp, port = free_port(socket.SOCK_DGRAM), free_port()
    server = subprocess.Popen([sys.executable, "-m", "stream", "live", f"udp://127.0.0.1:{udp}", "--config",
                               str(config), "--stream-id", "cam", "--http", f"127.0.0.1:{port}",
                               "--max-new-tokens", "4", "--status-every", "30", "--buffer", "64"], cwd=tree,
                              env=dict(os.environ, PYTHONPATH=str(tree)), stdout=subprocess.DEVNULL,
                              stderr=open(folder / "server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    ffmpeg = None
    stop = threading.Event()
    counts = dict(posted=0, refused=0, chat_abandoned=0)
    other: list[dict] = []
    try:
        for _ in range(900):
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        ffmpeg = subprocess.Popen(["ffmpeg", "-v", "error", "-readrate", str(args.readrate), "-i", str(path), "-c",
                                   "copy", "-f", "mpegts", f"udp://127.0.0.1:{udp}?pkt_size=1316"])
        watch = httpx.Client(base_url=base, timeout=60)
        while status(watch)["chunks_folded"] < 2:
            time.sleep(0.2)
        start, t0 = status(watch), time.perf_counter()
        time.sleep(args.quiet_s)
        quiet_end, t1 = status(watch), time.perf_counter()

        def flood(chat: bool) -> None:
            client = client_from("127.0.0.2", base, timeout=0.5 if chat else 10)
            while not stop.is_set():
                try:
                    if chat:
                        client.post("/v1/chat/completions", json={"model": "cam", "messages": [
                            {"role": "user", "content": QUESTION}]})
                    else:
                        reply = client.post("/streams/cam/questions", json={"question": QUESTION})
                        if reply.status_code >= 400:
                            counts["refused"] += 1
                            time.sleep(0.05)
                        else:
                            counts["posted"] += 1
                except httpx.TimeoutException:
                    counts["chat_abandoned"] += 1
                except httpx.HTTPError:
                    time.sleep(0.05)

        def ask_other() -> None:
            client = client_from("127.0.0.3", base)
            while not stop.is_set():
                since = client.get("/streams/cam/answers", params={"limit": 1}).json()["newest"]
                asked = time.perf_counter()
                reply = client.post("/streams/cam/questions", json={"question": "what digit is on screen now ?"})
                if reply.status_code >= 400:
                    other.append(dict(refused=reply.status_code, detail=reply.text[:200]))
                else:
                    qid, found = reply.json()["id"], None
                    while found is None and not stop.is_set():  # 20 polls a second, within the rate limit
                        page = client.get("/streams/cam/answers", params={"since": since, "limit": 1000})
                        found = next((a for a in page.json()["answers"] if a["question_id"] == qid), None) \
                            if page.status_code == 200 else None
                        time.sleep(0.05)
                    if found is not None:
                        other.append(dict(ask_to_answer_s=round(time.perf_counter() - asked, 3),
                                          answer_latency_s=found["latency_s"]))
                stop.wait(args.other_every)

        threads = [threading.Thread(target=flood, args=(i % 2 == 1,), daemon=True) for i in range(args.flooders)]
        threads.append(threading.Thread(target=ask_other, daemon=True))
        for thread in threads:
            thread.start()
        time.sleep(args.flood_s)
        flood_end, t2 = status(watch), time.perf_counter()
        stop.set()
        answers = watch.get("/streams/cam/answers", params={"since": 0, "limit": 1000}).json()["answers"]
    finally:
        stop.set()
        if ffmpeg is not None:
            ffmpeg.kill()
        server.kill()
    quiet, flooded = rate(start, quiet_end, t1 - t0), rate(quiet_end, flood_end, t2 - t1)
    answer_s = statistics.median(a["latency_s"] for a in answers) if answers else None
    waits = [o["ask_to_answer_s"] for o in other if "ask_to_answer_s" in o]
    # before its answer began: the queue and the fold under way, without the answer's own time (on a loaded
    # machine one answer's time varies tenfold) nor the client's 50 ms polling
    queued = [o["ask_to_answer_s"] - o["answer_latency_s"] for o in other if "ask_to_answer_s" in o]
    result = dict(
        unloaded=quiet, flooded=flooded,
        flooded_vs_unloaded=round(flooded["chunks_per_s"] / quiet["chunks_per_s"], 3)
        if quiet["chunks_per_s"] else None,
        flood=counts, model_answer_s_median=answer_s,
        other_client=dict(asked=len(other), answered=len(waits), refused=sum("refused" in o for o in other),
                          ask_to_answer_s_median=round(statistics.median(waits), 3) if waits else None,
                          ask_to_answer_s_max=max(waits) if waits else None,
                          in_answer_times_median=round(statistics.median(waits) / answer_s, 1)
                          if waits and answer_s else None,
                          waited_before_its_answer_s_median=round(statistics.median(queued), 3) if queued else None,
                          waited_before_its_answer_s_max=round(max(queued), 3) if queued else None,
                          waited_in_answer_times_median=round(statistics.median(queued) / answer_s, 1)
                          if queued and answer_s else None, tries=other),
        tree=str(tree), load_average=os.getloadavg(),
        command="python benchmarks/fold_share.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    stem = f"fold_share{args.suffix}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    o = result["other_client"]
    (args.out / f"{stem}.md").write_text(
        f"# Folding's share under a flood of questions\n\n`{result['command']}` (code of `{tree}`): `live --http`, "
        f"the shipped model, 16-frame chunks, a synthetic video over UDP at {args.readrate:g}x real time; "
        f"{args.quiet_s:g} s unloaded, then {args.flood_s:g} s with one client (127.0.0.2, {args.flooders} "
        f"threads: REST questions and abandoned chat requests) keeping the queue full while another (127.0.0.3) "
        f"asks every {args.other_every:g} s. Machine: 2 cores shared with other jobs (load average "
        f"{result['load_average'][0]:.1f}).\n\n| figure | unloaded | flooded |\n|---|---|---|\n"
        f"| chunks folded per second | {quiet['chunks_per_s']} | {flooded['chunks_per_s']} "
        f"({100 * (result['flooded_vs_unloaded'] or 0):.0f}% of unloaded; target >= 80%) |\n"
        f"| frames dropped | {quiet['frames_dropped']} | {flooded['frames_dropped']} |\n"
        f"| lag at the end (s) | {quiet['lag_s_at_end']} | {flooded['lag_s_at_end']} |\n"
        f"| answers given | {quiet['answers']} | {flooded['answers']} |\n\n"
        f"Flood: {counts['posted']} questions accepted, {counts['refused']} refused (the client's share of the queue "
        f"or its rate), {counts['chat_abandoned']} chat requests abandoned.\n\n"
        f"The other client: {o['answered']} of {o['asked']} questions answered ({o['refused']} refused), "
        f"ask-to-answer median {o['ask_to_answer_s_median']} s, longest {o['ask_to_answer_s_max']} s; the model "
        f"takes {answer_s and round(answer_s, 3)} s per answer (median), so the median wait is "
        f"{o['in_answer_times_median']} answer times (target: within 2). Before its answer began (ask-to-answer "
        f"less the answer's own time): median {o['waited_before_its_answer_s_median']} s "
        f"({o['waited_in_answer_times_median']} answer times), longest {o['waited_before_its_answer_s_max']} s.\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
