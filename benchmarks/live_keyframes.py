"""Live sources with long keyframe intervals: how soon the first frame comes after joining mid-GOP and after
the source restarts.

    python benchmarks/live_keyframes.py                    # 25 s GOP, 10 tries each; docs/benchmarks/live_keyframes.*
    python benchmarks/live_keyframes.py --tree /tmp/before --suffix=-before   # an older checkout's reader

Each try streams ffmpeg's testsrc (160x120, 10 frames/s, H.264 with a keyframe exactly every --gop seconds:
-g, -keyint_min, -sc_threshold 0) as MPEG-TS over UDP in real time to 127.0.0.1, as a camera does, and opens
a `LiveSource` (its defaults: 5 s open and 3 s read timeouts) at a random moment inside a GOP (join: the time
to its first frame). Then the source is killed, stays down 1-10 s (also shorter than the read timeout), and
is started again (restart: the time from its start to the first frame after it). Target for both: within the
GOP + 5 s (30 s at 25 s) in every try. Tries run --parallel at a time, each on its own port.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def camera(port: int, gop_s: float) -> subprocess.Popen:
    frames = str(round(10 * gop_s))
    return subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
                             "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", frames,
                             "-keyint_min", frames, "-sc_threshold", "0", "-pix_fmt", "yuv420p", "-f", "mpegts",
                             f"udp://127.0.0.1:{port}?pkt_size=1316"])


def first_frame(source, limit_s: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if source.get(0.05) is not None:
            return round(time.monotonic() - started, 2)
    return None


def one_try(live_source, gop_s: float, limit_s: float, seed: int) -> dict:
    rng = random.Random(seed)
    port = free_udp_port()
    into_gop = rng.uniform(1.0, gop_s - 1.0)
    down = rng.uniform(1.0, 10.0)  # below the 3 s read timeout too: a restart the reader did not notice
    ffmpeg = camera(port, gop_s)
    source = None
    try:
        time.sleep(into_gop)
        source = live_source(f"udp://127.0.0.1:{port}", fps=2).start()
        join = first_frame(source, limit_s)
        connects_at_join = source.connects
        if join is None:
            return dict(seed=seed, joined_into_gop_s=round(into_gop, 1), join_s=None, restart_s=None,
                        connects=source.connects, last_error=source.last_error)
        time.sleep(2.0)
        ffmpeg.kill()
        ffmpeg.wait()
        time.sleep(down)
        while source.get(0) is not None:  # what was read before the kill
            pass
        ffmpeg = camera(port, gop_s)
        restart = first_frame(source, limit_s)
        return dict(seed=seed, joined_into_gop_s=round(into_gop, 1), join_s=join, connects_at_join=connects_at_join,
                    down_s=round(down, 1), restart_s=restart, connects=source.connects,
                    skipped_packets=getattr(source, "skipped_packets", None), last_error=source.last_error)
    finally:
        ffmpeg.kill()
        ffmpeg.wait()
        if source is not None:
            source.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gop", type=float, default=25.0, help="seconds between keyframes")
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=5, help="tries at once (each a light 160x120 ffmpeg)")
    parser.add_argument("--limit-s", type=float, default=90.0, help="give a try up after this long without a frame")
    parser.add_argument("--tree", type=Path, help="checkout whose stream/live.py runs (e.g. an older commit)")
    parser.add_argument("--suffix", default="", help="added to the output names (e.g. -before)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.tree or ROOT))
    from stream.live import LiveSource

    results: list[dict] = []
    lock = threading.Lock()
    seeds = list(range(args.tries))
    started = time.time()

    def worker() -> None:
        while True:
            with lock:
                if not seeds:
                    return
                seed = seeds.pop(0)
            result = one_try(LiveSource, args.gop, args.limit_s, seed)
            print(json.dumps(result), flush=True)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(args.parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.sort(key=lambda r: r["seed"])
    target = args.gop + 5
    joins = [r["join_s"] for r in results]
    restarts = [r["restart_s"] for r in results if r["join_s"] is not None]
    summary = dict(
        gop_s=args.gop, tries=args.tries, target_s=target, reader=str(Path(sys.modules["stream.live"].__file__)),
        join_within_target=sum(j is not None and j <= target for j in joins),
        join_max_s=max((j for j in joins if j is not None), default=None),
        join_no_frame=sum(j is None for j in joins),
        restart_within_target=sum(r is not None and r <= target for r in restarts),
        restart_max_s=max((r for r in restarts if r is not None), default=None),
        restart_no_frame=sum(r is None for r in restarts), limit_s=args.limit_s,
        seconds=round(time.time() - started),
        command="python benchmarks/live_keyframes.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    stem = f"live_keyframes{args.suffix}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(dict(summary, tries_detail=results), indent=1) + "\n")
    rows = "\n".join(f"| {r['seed']} | {r['joined_into_gop_s']} | {r['join_s'] if r['join_s'] is not None else '-'} "
                     f"| {r.get('down_s', '-')} | {r['restart_s'] if r['restart_s'] is not None else '-'} "
                     f"| {r['connects']} |" for r in results)
    (args.out / f"{stem}.md").write_text(
        f"# Live source with a {args.gop:g} s keyframe interval: first frame after joining and after a restart\n\n"
        f"`{summary['command']}` (reader: `{summary['reader']}`), ffmpeg testsrc 160x120 at 10 frames/s as "
        f"MPEG-TS over UDP on 127.0.0.1, a try given up after {args.limit_s:g} s without a frame.\n\n"
        f"| figure | value |\n|---|---|\n"
        f"| joined mid-GOP: first frame within {target:g} s | {summary['join_within_target']} of {args.tries} "
        f"(longest {summary['join_max_s']} s, none at all: {summary['join_no_frame']}) |\n"
        f"| source restarted: first frame within {target:g} s | {summary['restart_within_target']} of "
        f"{len(restarts)} (longest {summary['restart_max_s']} s, none at all: {summary['restart_no_frame']}) |\n\n"
        f"| try | joined this far into a GOP (s) | first frame after (s) | source down (s) | first frame after "
        f"its restart (s) | connections opened |\n|---|---|---|---|---|---|\n{rows}\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
