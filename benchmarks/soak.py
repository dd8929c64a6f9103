"""Soak: an endless stream under a token budget must run in constant memory.

    python benchmarks/soak.py                      # 20,480 sampled frames, writes docs/benchmarks/soak.*
    python benchmarks/soak.py --frames 2048 --out /tmp/soak   # a quick look
    python benchmarks/soak.py --video 360p                     # `emloc-stream run` on a real-size file

Streams synthetic video (a new 64-frame clip per chunk, timestamps continuing) through
`StreamRunner` with the shipped tiny model and a per-layer token budget, answers a
question every 10 chunks, and samples the process RSS and the cache bytes after every
chunk. Prints the RSS growth over the last 80% of the run (target < 5%) and the spread
of cache bytes once the budget is reached (target: flat).

With --video (360p, 1080p or a file) it measures what a user runs instead: the CLI's
`run` on a video file at its real resolution (made with ffmpeg's test pattern, 20 minutes
by default), its RSS sampled from /proc every half second and tied to the frames folded
(soak-<name>.{md,json,png}; targets: peak at most 1.5 GB at 360p and 2.5 GB at 1080p,
the last 80% within 5%).

Samples miss the saw-tooth between folds (a fold's peak lasts less than a sample's interval),
so both modes also report the kernel's high-water mark, `ru_maxrss` from `getrusage`: of the
`run` process (RUSAGE_CHILDREN once it is waited for: what `/usr/bin/time -f %M` prints), and
of this process and its children in the in-process soak. The peak is that figure, not the
samples' maximum.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emloc import StreamContext, load_adapter  # noqa: E402
from emloc.settings import videomme_online  # noqa: E402
from stream.models import DEFAULT_MODEL  # noqa: E402
from stream.questions import Question, QuestionQueue  # noqa: E402
from stream.runtime import StreamRunner  # noqa: E402
from stream.sources import Frame  # noqa: E402
from stream.suites.synthetic import make_video  # noqa: E402


def max_rss_mib(who: int) -> float:
    """The kernel's high-water mark of resident memory (ru_maxrss, KiB on Linux) of RUSAGE_SELF or of the
    largest waited-for child (RUSAGE_CHILDREN), in MiB."""
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


SIZES = {"360p": (640, 360), "1080p": (1920, 1080)}
QUESTION = "what digit is on screen now ?"


def test_video(name: str, minutes: float, folder: Path) -> Path:
    """ffmpeg's testsrc2 pattern at 25 fps, H.264 (made once, then reused)."""
    width, height = SIZES[name]
    path = folder / f"testsrc2-{width}x{height}-{minutes:g}min.mp4"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part.mp4")
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size={width}x{height}:rate=25", "-t", str(minutes * 60), "-c:v", "libx264",
                        "-preset", "ultrafast", "-crf", "30", "-pix_fmt", "yuv420p", str(part)], check=True)
        part.rename(path)
    return path


def vm_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def soak_video(args: argparse.Namespace, argv: list[str] | None) -> None:
    """`emloc-stream run` on one file, its RSS sampled every half second."""
    name = args.video if args.video in SIZES else Path(args.video).stem
    path = test_video(args.video, args.minutes, args.videos) if args.video in SIZES else Path(args.video)
    before = max_rss_mib(resource.RUSAGE_CHILDREN)  # ffmpeg's, if it made the video: the run's must exceed it
    tree = args.tree or ROOT
    budget = args.budget or 2000
    command = [sys.executable, "-m", "stream", "run", str(path), "--budget", str(budget), "--ask", QUESTION]
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folded = [0]  # frames folded so far, from the progress lines "[  128 frames ...]"
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip())
            match = re.match(r"\[\s*(\d+)", line)
            if match:
                folded[0] = int(match.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples, t0 = [], time.perf_counter()
    while proc.poll() is None:
        rss = vm_rss_mib(proc.pid)
        seconds = time.perf_counter() - t0
        if rss is not None:
            samples.append(dict(seconds=round(seconds, 1), rss_mib=round(rss, 1), frames_folded=folded[0]))
        if args.limit_s and seconds > args.limit_s:
            proc.terminate()
            break
        time.sleep(0.5)
    proc.wait()
    reader.join(timeout=10)
    kernel_peak = max_rss_mib(resource.RUSAGE_CHILDREN)
    result = dict(video=str(path.name), budget=budget, returncode=proc.returncode,
                  kernel_peak_rss_mib=kernel_peak if kernel_peak > before else None,
                  stopped_after_s=args.limit_s if proc.returncode != 0 else None, tree=str(tree),
                  command="python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  run=" ".join(command[1:]), last_lines=lines[-4:])
    report_video(result, samples, args.out, f"soak-{name}{args.suffix}")


def report_video(result: dict, samples: list[dict], out: Path, stem: str) -> None:
    """Figures, JSON, markdown and plot of one `run` soak (also: --report FILE.json redraws them)."""
    total = max(s["frames_folded"] for s in samples)
    # the peak of each fold (samples grouped by the frames folded when they were taken), over the
    # last 80% of the frames; growth compares the highest of them in its first and second halves
    peaks: dict[int, float] = {}
    for s in samples:
        peaks[s["frames_folded"]] = max(peaks.get(s["frames_folded"], 0.0), s["rss_mib"])
    tail = [peak for frames, peak in sorted(peaks.items()) if 0.2 * total <= frames < total]
    half = len(tail) // 2
    growth = round(100 * (max(tail[half:]) - max(tail[:half])) / max(tail[:half]), 1) if half else None
    result = dict(result, frames_folded=total, seconds=samples[-1]["seconds"],
                  peak_rss_mib=max(s["rss_mib"] for s in samples),
                  fold_peaks_last_80_percent_min_max_mib=[min(tail), max(tail)] if tail else None,
                  fold_peaks_spread_last_80_percent=round(100 * (max(tail) - min(tail)) / min(tail), 1)
                  if tail else None, peak_growth_last_80_percent=growth)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(dict(result, samples=samples), indent=1) + "\n")
    stopped = f", stopped after {result['stopped_after_s']:.0f} s" if result.get("stopped_after_s") else ""
    (out / f"{stem}.md").write_text(
        f"# Soak at real resolution: `emloc-stream run` on {result['video']}\n\n"
        f"`{result['command']}` (runs `{result['run']}` on `{result['tree']}`), shipped tiny model, CPU: "
        f"{total} frames folded in {result['seconds']:.0f} s{stopped}.\n\n| figure | value |\n|---|---|\n"
        f"| peak RSS, kernel's high-water mark (ru_maxrss of the run process, as `/usr/bin/time -f %M`) | "
        f"{result.get('kernel_peak_rss_mib') or '-'} MiB |\n"
        f"| peak RSS of the samples (every 0.5 s: misses the peaks within a fold) | "
        f"{result['peak_rss_mib']:.0f} MiB |\n"
        f"| growth of the fold peaks over the last 80% of frames (highest of its 2nd half vs 1st half) | "
        f"{result['peak_growth_last_80_percent']}% |\n"
        f"| peak RSS of each fold over the last 80% of frames, min / max | "
        f"{' / '.join(f'{x:.0f}' for x in result['fold_peaks_last_80_percent_min_max_mib'] or [])} MiB |\n"
        f"| their spread (fold to fold: how much a fold's search does, not growth) | "
        f"{result['fold_peaks_spread_last_80_percent']}% |\n\n![RSS over the stream]({stem}.png)\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([s["seconds"] for s in samples], [s["rss_mib"] for s in samples], label="RSS (MiB)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS (MiB)")
        ax2 = ax.twinx()
        ax2.plot([s["seconds"] for s in samples], [s["frames_folded"] for s in samples], color="tab:orange",
                 label="frames folded")
        ax2.set_ylabel("frames folded")
        fig.legend(loc="lower right")
        ax.set_title(f"emloc-stream run on {result['video']}, budget {result['budget']}")
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
    print(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=20_480)
    parser.add_argument("--budget", type=int, default=None, help="tokens per layer (512; with --video 2000)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--video", help="360p, 1080p (ffmpeg test pattern) or a video file: measure the CLI's run")
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the 360p/1080p test video")
    parser.add_argument("--videos", type=Path, default=Path("/tmp/emloc-soak-videos"), help="where test videos go")
    parser.add_argument("--tree", type=Path, help="checkout whose code runs (e.g. an older commit, for 'before')")
    parser.add_argument("--suffix", default="", help="added to the output names (e.g. -before)")
    parser.add_argument("--limit-s", type=float, default=None, help="stop the run after this many seconds")
    parser.add_argument("--report", type=Path, help="redraw the figures of a saved soak-<name>.json")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        samples = saved.pop("samples")
        report_video(saved, samples, args.report.parent, args.report.stem)
        return
    if args.video:
        soak_video(args, argv)
        return
    args.budget = args.budget or 512
    torch.set_num_threads(2)
    adapter = load_adapter(str(DEFAULT_MODEL))
    settings = videomme_online(layer_groups=2, token_budget=args.budget)
    context = StreamContext(adapter, settings=settings)
    queue = QuestionQueue()
    class Count:  # only counts: an endless stream must not keep what it delivered
        answers = 0

        def deliver(self, event):
            Count.answers += 1

        def close(self):
            pass

    samples = []

    def on_fold(runner: StreamRunner) -> None:
        k = context.chunks_folded
        if k % 10 == 0:
            queue.submit(Question(f"q{k}", "what digit is on screen now ?"))
        samples.append(dict(chunk=k, frames=runner.status.frames_seen, seconds=round(time.perf_counter() - t0, 2),
                            rss_bytes=rss_bytes(), cache_bytes=context.cache.nbytes(),
                            cache_capacity_bytes=context.cache.capacity_nbytes(),
                            max_layer_tokens=max(context.cache.lengths()),
                            min_layer_tokens=min(context.cache.lengths())))
        if k % 50 == 0:
            s = samples[-1]
            print(f"chunk {k}: {s['frames']} frames, {s['seconds']} s, RSS {s['rss_bytes'] / 2**20:.1f} MiB, "
                  f"cache {s['cache_bytes'] / 1024:.0f} KiB, max layer {s['max_layer_tokens']} tokens", flush=True)

    runner = StreamRunner("soak", context, queue, [Count()], max_new_tokens=2, on_fold=on_fold)
    chunk = settings.chunk_frames
    t0 = time.perf_counter()
    for k in range(args.frames // chunk):
        video = make_video(50_000 + k, frames=chunk)
        for i, image in enumerate(video.frames):
            runner.feed(Frame(image, (k * chunk + i) / video.fps))
    runner.finish()

    n = len(samples)
    tail = samples[n // 5:]
    growth = (tail[-1]["rss_bytes"] - tail[0]["rss_bytes"]) / tail[0]["rss_bytes"]
    # every layer at the budget: from then on each fold evicts as much as it adds
    full = next((i for i, s in enumerate(samples) if s["min_layer_tokens"] >= args.budget), n - 1)
    after = [s["cache_bytes"] for s in samples[full:]]
    result = dict(frames=samples[-1]["frames"], chunks=n, budget=args.budget, seconds=samples[-1]["seconds"],
                  answers=Count.answers, rss_growth_last_80_percent=round(100 * growth, 2),
                  rss_mib_first=round(samples[0]["rss_bytes"] / 2**20, 1),
                  rss_mib_last=round(samples[-1]["rss_bytes"] / 2**20, 1),
                  budget_reached_at_chunk=samples[full]["chunk"], cache_bytes_after_budget_min=min(after),
                  cache_bytes_after_budget_max=max(after),
                  max_layer_tokens=max(s["max_layer_tokens"] for s in samples),
                  kernel_peak_rss_mib=max_rss_mib(resource.RUSAGE_SELF),
                  kernel_peak_rss_mib_children=max_rss_mib(resource.RUSAGE_CHILDREN),
                  rss_mib_max_sampled=round(max(s["rss_bytes"] for s in samples) / 2**20, 1),
                  command="python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "soak.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "soak.md").write_text(
        "# Soak: endless stream under a token budget (shipped tiny model, CPU)\n\n"
        f"`{result['command']}`: {result['frames']} sampled frames ({result['frames'] / 2 / 3600:.1f} h of video at "
        f"2 fps) in {n} chunks, budget {args.budget} tokens/layer, {result['answers']} answers, "
        f"{result['seconds']:.0f} s.\n\n"
        "| figure | value |\n|---|---|\n"
        f"| RSS growth over the last 80% of the run | {result['rss_growth_last_80_percent']}% |\n"
        f"| RSS first / last chunk | {result['rss_mib_first']} / {result['rss_mib_last']} MiB |\n"
        f"| peak RSS, kernel's high-water mark (ru_maxrss of this process) / sampled after each chunk | "
        f"{result['kernel_peak_rss_mib']} / {result['rss_mib_max_sampled']} MiB |\n"
        f"| every layer at the budget from chunk | {result['budget_reached_at_chunk']} |\n"
        f"| cache bytes after that, min / max | {result['cache_bytes_after_budget_min']} / "
        f"{result['cache_bytes_after_budget_max']} |\n"
        f"| most tokens any layer held | {result['max_layer_tokens']} (budget {args.budget}) |\n\n"
        "![RSS and cache bytes per chunk](soak.png)\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        chunks = [s["chunk"] for s in samples]
        ax.plot(chunks, [s["rss_bytes"] / 2**20 for s in samples], label="process RSS (MiB)")
        ax.set_xlabel("chunks folded (64 frames each)")
        ax.set_ylabel("RSS (MiB)")
        ax2 = ax.twinx()
        ax2.plot(chunks, [s["cache_bytes"] / 1024 for s in samples], color="tab:orange", label="cache (KiB)")
        ax2.set_ylabel("KV cache (KiB)")
        fig.legend(loc="lower right")
        ax.set_title("Memory of an endless stream under a token budget")
        fig.tight_layout()
        fig.savefig(args.out / "soak.png", dpi=110)
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
