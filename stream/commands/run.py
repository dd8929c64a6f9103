"""`emloc-stream run`: one video file (or folder of images), start to end, questions answered at its end."""

from __future__ import annotations

import argparse
from pathlib import Path

from emloc import InputError, StreamContext

from ..offline import answer_video
from ..sources import open_source
from ..state import StateError
from .common import build_model, config_from, deliver, footer, progress_printer


def run(args: argparse.Namespace) -> int:
    config, given = config_from(args)
    if not args.ask:
        raise InputError("give at least one question with --ask")
    from ..state import has_state, load_state, save_state

    source = open_source(args.video, args.image_fps)
    adapter, settings, label = build_model(config, args.model, given)
    context = StreamContext(adapter, settings=settings)
    print(f"emloc-stream run: {label}", flush=True)
    frames = source.frames(fps=config.model.fps)
    video_id = str(Path(args.video).resolve())
    if args.state and has_state(args.state):
        stream = load_state(args.state, context)
        if stream.get("video") != video_id:
            raise StateError(f"{args.state}: this state belongs to {stream.get('video')!r}, not {video_id!r}")
        if stream.get("query_aware", False) != args.query_aware:
            raise StateError(f"{args.state}: this state was folded {'with' if not args.query_aware else 'without'} "
                             f"--query-aware; resume it the same way (or use a new --state)")
        done = float(stream["last_time"])
        frames = (f for f in frames if f.time > done + 1e-6)
        print(f"resumed from {args.state}: {context.chunks_folded} chunks already folded, up to {done:.1f} s",
              flush=True)
    progress = progress_printer(None, source.duration())

    def on_fold(record) -> None:
        progress(record)
        if args.state and context.chunks_folded % args.save_every == 0:
            save_state(args.state, context, dict(video=video_id, last_time=record.time_span[1],
                                                 query_aware=args.query_aware))

    answers = answer_video(context, frames, args.ask, query_aware=args.query_aware,
                           max_new_tokens=args.max_new_tokens, on_fold=on_fold)
    if args.state and context.records and context.chunks_folded % args.save_every:  # else the last fold saved
        save_state(args.state, context, dict(video=video_id, last_time=context.records[-1].time_span[1],
                                             query_aware=args.query_aware))
    deliver(context, Path(args.video).name, args.ask, answers)
    print(footer(context))
    return 0


def register(commands, common) -> None:
    p = commands.add_parser("run", help="fold a video file and answer questions about it")
    common(p)
    p.add_argument("video", help="video file (decord, else PyAV) or a folder of images")
    p.add_argument("--image-fps", type=float, default=2.0, help="frames per second of a folder of images")
    p.add_argument("--query-aware", action="store_true",
                   help="let the questions guide pruning (they are known before the video)")
    p.add_argument("--state", type=Path, help="save the stream state here; resume from it if present")
    p.add_argument("--save-every", type=int, default=1, help="chunks between saves of --state")
    p.set_defaults(run=run)
