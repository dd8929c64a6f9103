"""`emloc-stream demo`: a synthetic video, folded and answered next to its ground truth (offline)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

from ..engine import build_model, print_model_note
from ..models import CAMERA_MODEL
from ..sources import VideoFile, write_video
from .common import config_from, deliver, footer


def demo(args: argparse.Namespace) -> int:
    from emloc import StreamContext

    from ..job import answer_video, progress
    from ..suites import camera as synthetic_camera
    from ..suites import synthetic

    config = config_from(args)
    suite = synthetic_camera if args.suite == "camera" else synthetic
    model = args.model or (str(CAMERA_MODEL) if suite is synthetic_camera and not config.model.path else None)
    adapter, settings, label = build_model(config, model)
    context = StreamContext(adapter, settings=settings)
    print(f"emloc-stream demo: {label}", flush=True)
    print_model_note(adapter.model_note)
    video = suite.make_video(args.seed, frames=args.frames, **({"size": args.size} if args.size else {}))
    size = video.frames.shape[1]
    with TemporaryDirectory() as tmp:
        path = write_video(args.save_video or Path(tmp) / "demo.mp4", video.frames, fps=video.fps)
        print(f"video: synthetic seed {args.seed}, {args.frames} frames at {video.fps:g} fps "
              f"({args.frames / video.fps:.0f} s), {size}x{size}, written to {path}", flush=True)
        questions = args.ask or [video.question(kind).text for kind in suite.QUESTION_TYPES]
        expected = None if args.ask else [video.question(kind).answer for kind in suite.QUESTION_TYPES]
        if args.query_aware:
            print("observers: the questions, known before the video (--no-query-aware: the probe prompt only, as a "
                  "live stream without standing questions)", flush=True)
        answers = answer_video(context, VideoFile(path).frames(fps=config.model.fps), questions,
                               query_aware=args.query_aware, max_new_tokens=args.max_new_tokens,
                               stream_id="demo", on_fold=progress(args.frames))
    correct = deliver(context, "demo", questions, answers, expected)
    if expected:
        print(f"{correct}/{len(questions)} answers match the ground truth")
    print(footer(context))
    return 0


class _Probe(argparse.Action):
    """The old spelling of --no-query-aware, still taken, with a notice."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print("emloc-stream demo: --probe is now spelled --no-query-aware", file=sys.stderr, flush=True)
        namespace.query_aware = False


def register(commands, common) -> None:
    p = commands.add_parser("demo", help="generate a synthetic video, fold it, answer its questions (offline)")
    common(p)
    p.add_argument("--frames", type=int, default=256, help="length of the synthetic video (even, >= 16)")
    p.add_argument("--size", type=int, help="frame side in pixels, a multiple of 28 (default 56; camera: 112)")
    p.add_argument("--suite", choices=["synthetic", "camera"], default="synthetic",
                   help="camera: real footage, 112x112, five question types (stream/suites/camera.py); its "
                   "model, stream/models/emloc-tiny-camera, unless --model or --config names one")
    p.add_argument("--seed", type=int, default=7, help="which synthetic video")
    p.add_argument("--save-video", type=Path, help="keep the generated video file here")
    p.add_argument("--query-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="let the questions guide the pruning (default; --no-query-aware: the probe prompt does)")
    p.add_argument("--probe", action=_Probe, nargs=0, dest="query_aware", help=argparse.SUPPRESS)
    p.set_defaults(run=demo)
