"""`emloc-stream batch`: many recorded videos, a file of questions, answers as JSON Lines (resumable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emloc import InputError

from .. import distributed
from ..engine import build_model, check_output, check_task, load_task, print_model_note
from ..question_files import load_questions
from ..sources import IMAGE_SUFFIXES, VideoError
from .common import add_task_option, config_from, positive_seconds, task_path

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".ts", ".m4v", ".flv", ".mpg", ".mpeg"}


def _batch_videos(source: str) -> tuple[list[Path], Path]:
    """The videos, and the folder their names in a questions file are relative to."""
    path = Path(source)
    if path.is_dir():
        videos = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        videos += sorted(p for p in path.iterdir() if p.is_dir() and any(  # sub-folders of images: one video each
            f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()))
        if not videos:
            raise InputError(f"{path}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) or image folders")
        return videos, path
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return [path], path.parent
    if path.is_file():  # a list: one video path per line, relative to the list's folder
        try:
            lines = [line.strip() for line in path.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: cannot read the list of videos: {error}") from error
        return [(path.parent / line) for line in lines if line and not line.startswith("#")], path.parent
    raise InputError(f"{path}: not a folder, a video file or a list of videos")


def _questions(args: argparse.Namespace) -> list:
    from ..questions import BadQuestion, Question

    questions = load_questions(args.questions) if args.questions else []
    standing = [q.id for q in questions if q.every is not None]
    if standing:  # the schema has it for live streams; a recorded video's question is answered once
        raise InputError(f"{args.questions}: question(s) {standing[:5]} have 'every' (a standing question, for live "
                         f"streams); a batch answers each question once, at its 'at' or at the end of the video")
    taken = {q.id for q in questions}
    for i, text in enumerate(args.ask or [], 1):
        qid = f"ask{i}"
        if qid in taken:
            raise InputError(f"--ask question {i} would be id {qid!r}, which {args.questions} already uses")
        try:
            questions.append(Question(qid, text, origin="cli"))
        except BadQuestion as error:
            raise InputError(f"--ask {text!r}: {error}") from error
    if not questions:
        raise InputError("give the questions: --questions FILE and/or --ask QUESTION (asked of every video)")
    return questions


def batch(args: argparse.Namespace) -> int:
    from sinks import ConsoleSink, JsonLinesSink, read_answers

    from ..job import batch_jobs, batch_progress, unmatched

    config = config_from(args)
    videos, root = _batch_videos(args.videos)
    questions = _questions(args)
    check_output(args.out, "--out")
    for q in unmatched(videos, root, questions):
        print(f"emloc-stream batch: question {q.id!r} names video {q.meta['video']!r}, which is not in this batch; "
              f"not asked", file=sys.stderr, flush=True)
    jobs = batch_jobs(videos, root, questions, {(a["stream_id"], a["question_id"]) for a in read_answers(args.out)})
    task = task_path(args, config)
    pack = load_task(task)  # a damaged pack is named before any video is read
    if args.ray is not None:  # the same jobs, spread over a Ray cluster
        from ..distributed.batch import run_batch

        return run_batch(args, config, jobs, len(questions), task=str(Path(task).resolve()) if task else None)
    adapter, settings, label = build_model(config, args.model)
    check_task(task, pack, adapter, settings)
    print(f"emloc-stream batch: {len(videos)} videos, {len(questions)} questions; {label}; observers: "
          + ("the questions (--no-query-aware: the probe prompt)" if args.query_aware else "the probe prompt"),
          flush=True)
    print_model_note(adapter.model_note)
    if pack is not None:
        print(f"every video starts from {task}: {pack.describe()}", flush=True)
    sinks = [JsonLinesSink(args.out), ConsoleSink()]
    failed = 0
    try:
        for i, (job, skipped) in enumerate(jobs, 1):
            tag = f"[{i}/{len(jobs)}] {job.path}"
            if skipped:
                print(f"{tag}: {skipped}, skipped", flush=True)
                continue
            try:
                answered = job.answer(adapter, settings, fps=config.model.fps, query_aware=args.query_aware,
                                      max_new_tokens=args.max_new_tokens, task=pack, sinks=sinks,
                                      progress=batch_progress(tag, config.model.fps))
            except VideoError as error:
                failed += 1
                print(f"{tag}: error: {error}; its questions stay unanswered, a rerun retries it", file=sys.stderr,
                      flush=True)
                continue
            print(f"{tag}: {answered.frames} frames, {answered.chunks} chunks, {len(answered.events)} answers",
                  flush=True)
    finally:
        for sink in sinks:
            sink.close()
    return 1 if failed else 0


def register(commands, common) -> None:
    p = commands.add_parser(
        "batch", help="answer questions about many videos, resumable",
        description="Answers a file of questions about many recorded videos. A question without \"at\" is "
        "answered when "
        "its video ends, over the whole video; one with \"at\": SECONDS when the video gets there (at its end"
        " if it is shorter). The questions are known before the videos, so they guide the pruning (--no-"
        "query-aware: the probe prompt does, as for a live stream). A questions file with any bad line is "
        "refused before any video is read, every bad line listed: fixing it then costs nothing, running only "
        "the good lines would cost another pass over every video later. A question naming a video not in the "
        "batch is reported. --ask questions are asked of every video. Answers already in --out are skipped, "
        "so an interrupted batch resumes.")
    common(p)
    p.add_argument("videos", help="a folder of videos, one video, or a text file listing videos")
    p.add_argument("--questions", help='JSON Lines: {"id", "question", optional "video", "at", "expected"}; '
                   '"video" (a file name or a path relative to the folder) limits it to that video')
    p.add_argument("--query-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="let the questions guide the pruning (default; --no-query-aware: the probe prompt does, as "
                   "for a live stream)")
    p.add_argument("--out", required=True, type=Path, help="answers, JSON Lines; answered pairs are skipped")
    add_task_option(p)
    distributed.options(p, "worker")
    p.add_argument("--workers", type=int,
                   help="with --ray: worker actors (default: the cluster's CPUs / --cpus-per-worker)")
    p.add_argument("--retries", type=int, default=2, help="with --ray: times a failed video is tried again")
    p.add_argument("--worker-timeout", type=positive_seconds, default=600.0,
                   help="with --ray: give up when no worker has been up for this many seconds")
    p.add_argument("--revive-timeout", type=positive_seconds, default=300.0,
                   help="with --ray: a worker started to replace a lost one and not up after this many seconds "
                   "is given up and another started")
    p.set_defaults(run=batch)
