"""`emloc-stream run`: one video file (or folder of images), start to end, questions answered at its end."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emloc import InputError

from ..engine import build_model, check_model, check_state, check_task, load_task, model_name, print_model_note
from ..sources import IMAGE_SUFFIXES, open_source
from .common import add_task_option, config_from, deliver, footer, task_path


def _check_folder(path: Path) -> None:
    """A folder of images is one video; a folder of videos is `batch`'s job."""
    from .batch import VIDEO_SUFFIXES

    if path.is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        if any(p.suffix.lower() in VIDEO_SUFFIXES for p in path.rglob("*")):
            raise InputError(f"{path}: a folder of videos; `run` takes one video (or a folder of images): "
                             f"use `batch` for a folder of videos")


def _check_resume(args: argparse.Namespace, stream: dict, video_id: str, fingerprint) -> None:
    """A saved state resumes only the video it was folded from, folded the same way."""
    from ..state import StateError, check_source

    if "source" in stream:  # the video itself decides, wherever it lies now
        check_source(args.state, stream["source"], fingerprint)
    elif stream.get("video") != video_id:  # saved before fingerprints: by path, as then
        raise StateError(f"{args.state}: this state belongs to {stream.get('video')!r}, not {video_id!r}")
    else:
        print(check_source(args.state, None, fingerprint), flush=True)
    if stream.get("query_aware", False) != args.query_aware:
        raise StateError(f"{args.state}: this state was folded {'with' if not args.query_aware else 'without'} "
                         f"--query-aware; resume it the same way (or use a new --state)")


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    if not args.ask:
        raise InputError("give at least one question with --ask")
    from emloc import StreamContext

    from ..job import answer_video, progress
    from ..state import StateNotSaved, has_state, load_state, save_state, saved_stream, source_fingerprint

    _check_folder(Path(args.video))
    check_state(args.state)
    task = task_path(args, config)
    pack = load_task(task)  # a damaged pack is named before the video is opened
    source = open_source(args.video, args.image_fps)
    check_model(model_name(config, args.model))
    source.check()  # an unreadable video is named before the model loads (after the cheaper checks)
    video_id = str(Path(args.video).resolve())
    fingerprint = source_fingerprint(args.video) if args.state else None
    resuming = bool(args.state) and has_state(args.state)
    if resuming:  # another video's state, or this one's folded the other way, is named before the model loads
        _check_resume(args, saved_stream(args.state), video_id, fingerprint)
    adapter, settings, label = build_model(config, args.model)
    check_task(task, pack, adapter, settings)
    context = StreamContext(adapter, settings=settings, task=pack)
    print(f"emloc-stream run: {label}", flush=True)
    print_model_note(adapter.model_note)
    if pack is not None:
        print(f"starts from {task}: {pack.describe()}", flush=True)
    frames = source.frames(fps=config.model.fps)
    if resuming:
        stream = load_state(args.state, context)
        done = float(stream["last_time"])
        frames = (f for f in frames if f.time > done + 1e-6)
        print(f"resumed from {args.state}: {context.chunks_folded} chunks already folded, up to {done:.1f} s",
              flush=True)
    show_progress = progress(None, source.duration())
    unsaved = [""]  # why the last save failed ("" once one succeeds): folding goes on, saves are retried

    def save() -> None:
        try:
            save_state(args.state, context, dict(video=video_id, source=fingerprint,
                                                 last_time=context.records[-1].time_span[1],
                                                 query_aware=args.query_aware))
        except StateNotSaved as error:
            if not unsaved[0]:
                print(f"emloc-stream run: {error}; folding goes on, saves are retried every chunk", file=sys.stderr,
                      flush=True)
            unsaved[0] = str(error)
            return
        if unsaved[0]:
            print(f"emloc-stream run: state saved again in {args.state}", file=sys.stderr, flush=True)
        unsaved[0] = ""

    def on_fold(record) -> None:
        if args.state and (context.chunks_folded % args.save_every == 0 or unsaved[0]):
            save()
        show_progress(record)

    def save_last(always: bool = False) -> None:
        if args.state and context.records and (always or context.chunks_folded % args.save_every or unsaved[0]):
            save()

    try:
        answers = answer_video(context, frames, args.ask, query_aware=args.query_aware,
                               max_new_tokens=args.max_new_tokens, stream_id=Path(args.video).name, on_fold=on_fold)
    except KeyboardInterrupt:  # a fold cut short leaves the cache as the last whole fold left it
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the save short
        save_last(always=True)  # the interrupt may have cut the last fold's save short
        folded = f"{context.chunks_folded} chunks folded, up to {context.records[-1].time_span[1]:.1f} s" \
            if context.records else "nothing folded yet"
        saved = (f"; state saved in {args.state}, the same command resumes" if args.state and context.records
                 and not unsaved[0] else f"; {unsaved[0]}" if unsaved[0] else "")
        print(f"emloc-stream run: interrupted: {folded}{saved}", file=sys.stderr, flush=True)
        return 130
    save_last()
    deliver(context, Path(args.video).name, args.ask, answers)
    print(footer(context))
    if unsaved[0]:
        print(f"emloc-stream run: {unsaved[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def register(commands, common) -> None:
    p = commands.add_parser("run", help="fold a video file and answer questions about it")
    common(p)
    p.add_argument("video", help="video file (decord, else PyAV) or a folder of images")
    p.add_argument("--image-fps", type=float, default=2.0, help="frames per second of a folder of images")
    p.add_argument("--query-aware", action=argparse.BooleanOptionalAction, default=False,
                   help="let the questions guide the pruning (they are known before the video; default: the probe "
                   "prompt does, as for a live stream)")
    p.add_argument("--state", type=Path, help="save the stream state here; resume from it if present")
    p.add_argument("--save-every", type=int, default=1, help="chunks between saves of --state")
    add_task_option(p)
    p.set_defaults(run=run)
