"""Past its trained length, is a stream's miss the model's position range? The tiny models were
trained on at most 256 frames (128 temporal positions); at 1,024 and 4,096 frames they answered
worse with full context, and the default kept the needle's tokens yet answered it wrong
(benchmarks/agnostic.py's "needle kept" column). This runs the same videos and rows as
benchmarks/agnostic.py with the video's temporal positions multiplied by a fixed scale from the
first frame (position interpolation: 0.25 maps 1,024 frames onto the 256 the model knows);
height, width and text positions are unchanged, and the library's own policy (halving the
spacing when a stream reaches past `EMLoCSettings.temporal_range`, which needs no length in
advance) is off. A diagnostic: it showed the cause, and what that policy should get.

    python benchmarks/long_positions.py --frames 1024 --videos 40 --scales 1 0.25 --methods default full uniform
    python benchmarks/long_positions.py --suite camera --needle --videos 20 --scales 1 0.0625

Writes positions-TAG.json/.md to --out (docs/benchmarks by default).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import agnostic

ROOT = Path(__file__).resolve().parents[1]


def _init_worker(model: str, scale: float) -> None:
    agnostic._init_worker(model)
    adapter = agnostic._adapter
    adapter.temporal_range = None  # the stream's own policy off: one fixed scale
    plain = adapter.video_positions

    def scaled(video_start, first_step, pixels, policy_scale=1.0):
        return plain(video_start, first_step, pixels, scale * policy_scale)

    adapter.video_positions = scaled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(agnostic.SUITES), default="camera")
    parser.add_argument("--frames", type=int, help="default 1,024 (4,096 with --needle)")
    parser.add_argument("--model", help="default: the suite's model in models/")
    parser.add_argument("--videos", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--needle", action="store_true", help="4,096 frames, budget 10%%, needle in the first 5%%")
    parser.add_argument("--methods", nargs="+", default=["default", "full"],
                        choices=["default", "full", "uniform"], help="the default runs first (uniform takes its share)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    if any(not 0 < s <= 1 for s in args.scales):
        parser.error(f"every scale must lie in (0, 1], got {args.scales}")
    _, model_dir, seeds = agnostic.SUITES[args.suite]
    model, model_label = agnostic.resolve_model(parser, args.model, model_dir)
    frames = args.frames or (4096 if args.needle else 1024)
    names = tuple(sorted(dict.fromkeys(args.methods), key=lambda n: n != "default"))
    if "uniform" in names and "default" not in names:
        parser.error("uniform is matched to the default's share: run 'default' too")
    command = "python benchmarks/long_positions.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started, text, saved = time.time(), [], {}
    for scale in args.scales:
        jobs = [(args.suite, seeds + i, frames, names, args.needle, False) for i in range(args.videos)]
        clock = time.time()
        with multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, (model, scale)) as pool:
            rows = []
            for row in pool.imap_unordered(agnostic._run_video, jobs):
                rows.append(row)
                line = " ".join(f"{n}={agnostic.accuracy(rows, n)['mean']:.2f}" for n in names)
                print(f"[x {scale:g}: {len(rows)}/{args.videos}, {(time.time() - clock) / 60:.1f} min] {line}",
                      flush=True)
        rows.sort(key=lambda r: r["seed"])
        summary = agnostic.summarize(rows, names)
        meta = dict(suite=args.suite, model=model_label, videos=args.videos, frames=frames,
                    needle=args.needle, seeds=f"{seeds}..{seeds + args.videos - 1}",
                    kinds=agnostic.question_kinds(rows), budget=rows[0].get("budget"),
                    minutes=round((time.time() - clock) / 60, 1), command=command)
        table = agnostic.markdown(meta, summary).replace("### ", f"### temporal positions x {scale:g}: ", 1)
        print(table, flush=True)
        text.append(table)
        saved[f"{scale:g}"] = dict(meta=meta, summary=summary, videos=rows)
    stem = args.out / ("positions" + (f"-{args.tag}" if args.tag else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(saved, separators=(",", ":")) + "\n")
    stem.with_suffix(".md").write_text("\n".join(text))
    print(f"{(time.time() - started) / 60:.1f} min; wrote {stem}.md", flush=True)


if __name__ == "__main__":
    main()
