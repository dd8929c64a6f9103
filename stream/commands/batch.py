"""`emloc-stream batch`: many recorded videos, a file of questions, answers as JSON Lines (resumable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emloc import InputError, StreamContext

from .. import distributed
from ..sources import IMAGE_SUFFIXES, VideoError, open_source
from .common import build_model, config_from, load_questions

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".ts", ".m4v", ".flv", ".mpg", ".mpeg"}


def _batch_videos(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        videos = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        videos += sorted(p for p in path.iterdir() if p.is_dir() and any(  # sub-folders of images: one video each
            f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()))
        if not videos:
            raise InputError(f"{path}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) or image folders")
        return videos
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return [path]
    if path.is_file():  # a list: one video path per line, relative to the list's folder
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [(path.parent / line) for line in lines if line and not line.startswith("#")]
    raise InputError(f"{path}: not a folder, a video file or a list of videos")


def batch(args: argparse.Namespace) -> int:
    from sinks import ConsoleSink, JsonLinesSink, read_answers

    from ..questions import QuestionQueue
    from ..runtime import StreamRunner

    config, given = config_from(args)
    videos = _batch_videos(args.videos)
    questions = load_questions(args.questions)
    done = {(a["stream_id"], a["question_id"]) for a in read_answers(args.out)}
    if args.ray is not None:  # the same videos and questions, spread over a Ray cluster
        from ..distributed.batch import run_batch

        return run_batch(args, config, given, videos, questions, done)
    adapter, settings, label = build_model(config, args.model, given)
    print(f"emloc-stream batch: {len(videos)} videos, {len(questions)} questions; {label}", flush=True)
    sinks = [JsonLinesSink(args.out), ConsoleSink()]
    failed = 0
    try:
        for i, path in enumerate(videos, 1):
            stream_id = str(path)
            todo = [q for q in questions if q.meta.get("video") in (None, path.name, str(path))
                    and (stream_id, q.id) not in done]
            if not todo:
                print(f"[{i}/{len(videos)}] {path}: already answered, skipped", flush=True)
                continue
            context = StreamContext(adapter, settings=settings)
            queue = QuestionQueue(max_waiting=max(len(todo), 1))
            for q in todo:
                queue.submit(q)
            runner = StreamRunner(stream_id, context, queue, sinks, max_new_tokens=args.max_new_tokens)
            try:
                for frame in open_source(path).frames(fps=config.model.fps):
                    runner.feed(frame)
            except VideoError as error:
                failed += 1
                print(f"[{i}/{len(videos)}] error: {error}; its questions stay unanswered, a rerun retries it",
                      file=sys.stderr, flush=True)
                continue
            runner.finish()
            print(f"[{i}/{len(videos)}] {path}: {runner.status.frames_seen} frames, "
                  f"{runner.status.chunks_folded} chunks, {runner.status.answers} answers", flush=True)
    finally:
        for sink in sinks:
            sink.close()
    return 1 if failed else 0


def register(commands, common) -> None:
    p = commands.add_parser("batch", help="answer questions about many videos, resumable")
    common(p)
    p.add_argument("videos", help="a folder of videos, one video, or a text file listing videos")
    p.add_argument("--questions", required=True, help='JSON Lines: {"id", "question", optional "video", "at"}')
    p.add_argument("--out", required=True, type=Path, help="answers, JSON Lines; answered pairs are skipped")
    distributed.options(p, "worker")
    p.add_argument("--workers", type=int,
                   help="with --ray: worker actors (default: the cluster's CPUs / --cpus-per-worker)")
    p.add_argument("--retries", type=int, default=2, help="with --ray: times a failed video is tried again")
    p.add_argument("--worker-timeout", type=float, default=600.0,
                   help="with --ray: give up when no worker has been up for this many seconds")
    p.set_defaults(run=batch)
