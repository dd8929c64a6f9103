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
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emloc import StreamContext, load_adapter  # noqa: E402
from emloc.settings import videomme_online  # noqa: E402
from stream.questions import Question, QuestionQueue  # noqa: E402
from stream.runtime import StreamRunner  # noqa: E402
from stream.sources import Frame  # noqa: E402
from stream.synthetic import make_video  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=20_480)
    parser.add_argument("--budget", type=int, default=512, help="tokens per layer")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    adapter = load_adapter(str(ROOT / "models" / "emloc-tiny-qwen2vl"))
    settings = videomme_online(layer_group_size=adapter.num_layers // 2, token_budget=args.budget)
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
