"""The `emloc-stream` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

from emloc import EMLoCSettings, InputError, ModelAdapter, SettingsError, StreamContext, UnsupportedModelError

from .config import Config, ConfigError, load_config
from .offline import answer_video
from .sources import IMAGE_SUFFIXES, VideoError, VideoFile, open_source, write_video
from .state import StateError
from .synthetic import QUESTION_TYPES, make_video

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "emloc-tiny-qwen2vl"
RANDOM_MODEL = "builtin:random"  # a 28-layer tiny Qwen2-VL with random weights, for quick checks
# With no config file, the query-agnostic default of EMLoCSettings (docs/benchmarks/agnostic.md): the probe
# observer carries the model's own answer, tokens ranked by temporal novelty + key diversity, merged.
DEFAULT_PROBE_ANSWER_TOKENS = EMLoCSettings().probe_answer_tokens


def build_model(config: Config, model: str | None, settings_given: bool) -> tuple[ModelAdapter, EMLoCSettings, str]:
    """The model (a checkpoint folder or hub id, the shipped model, or the random built-in one), the
    settings every stream of it folds with, and a label for both.

    Without a config file the paper's online setting is used with its layer groups scaled
    to the model's depth (14 of Qwen2-VL-7B's 28 layers: half the layers per group).
    """
    options = dict(fps=config.model.fps, max_frame_pixels=config.model.max_frame_pixels)
    name = model or config.model.path or str(DEFAULT_MODEL)
    if name == RANDOM_MODEL:
        from emloc.adapters import adapter_for
        from emloc.tiny import tiny_qwen2_vl, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        adapter = adapter_for(tiny_qwen2_vl(tokenizer, layers=28, hidden=64, init_std=0.1), tokenizer, **options)
        label = "built-in tiny Qwen2-VL (random weights: its answers mean nothing)"
    else:
        from emloc import load_adapter

        if Path(name) == DEFAULT_MODEL and not DEFAULT_MODEL.is_dir():
            raise InputError(f"the shipped model is missing at {DEFAULT_MODEL}; pass --model PATH_OR_ID")
        adapter = load_adapter(name, device=config.model.device, **options)
        label = name if Path(name) != DEFAULT_MODEL else f"{DEFAULT_MODEL.relative_to(ROOT)} (shipped, trained here)"
    settings = config.emloc
    if not settings_given:  # the product default: the paper's online setting, plus the probe's own answer
        layers = adapter.num_layers
        settings = replace(settings, layer_group_size=layers // 2 if layers % 2 == 0 else 1,
                           probe_answer_tokens=DEFAULT_PROBE_ANSWER_TOKENS)
    settings.check_against(adapter.num_layers, adapter.temporal_patch)  # before any video is read
    return adapter, settings, f"{label}, {adapter.num_layers} layers; {_describe(settings)}"


def _config(args: argparse.Namespace) -> tuple[Config, bool]:
    config = load_config(args.config) if args.config else Config()
    if args.budget is not None:
        config = replace(config, emloc=replace(config.emloc, token_budget=args.budget))
    return config, bool(args.config)


def _describe(s: EMLoCSettings) -> str:
    return (f"layer groups of {s.layer_group_size}, delta {s.delta}, "
            f"ratios {list(s.ratios)}, {s.chunk_frames} frames a chunk"
            + (f", budget {s.token_budget}/layer" if s.token_budget else "")
            + (f", probe observer with its own answer (up to {s.probe_answer_tokens} tokens)"
               if s.probe_answer_tokens else ""))


def _progress(total: int | None, duration: float | None = None):
    """Prints each folded chunk: frames so far, and how far through the video."""
    seen = [0]

    def show(record) -> None:
        seen[0] += record.frames
        of = f"/{total}" if total else ""
        done = ""
        if duration and record.time_span:
            done = f" {min(100.0, 100 * record.time_span[1] / duration):5.1f}%"
        print(f"[{seen[0]:>5}{of} frames{done}] {record.summary()}", flush=True)
    return show


def _deliver(context: StreamContext, stream_id: str, questions: list[str], answers, expected=None) -> int:
    from sinks import AnswerEvent, ConsoleSink

    sink, correct = ConsoleSink(), 0
    for i, (question, answer) in enumerate(zip(questions, answers)):
        truth = expected[i] if expected else None
        correct += truth is not None and answer.text.strip() == truth
        sink.deliver(AnswerEvent(stream_id, f"q{i}", question, answer.text, answer.time_span, time.time(),
                                 answer.cache_tokens, answer.latency_s, expected=truth))
    return correct


def _footer(context: StreamContext) -> str:
    seen = context.tokens_seen - context.sink_tokens
    kept = sum(context.cache.lengths()) / context.adapter.num_layers - context.sink_tokens
    return (f"video tokens seen {seen}, kept {kept:.0f} per layer ({100 * kept / max(seen, 1):.1f}%), "
            f"cache {context.cache.nbytes() / 1024:.0f} KiB")


def demo(args: argparse.Namespace) -> int:
    config, given = _config(args)
    adapter, settings, label = build_model(config, args.model, given)
    context = StreamContext(adapter, settings=settings)
    print(f"emloc-stream demo: {label}", flush=True)
    video = make_video(args.seed, frames=args.frames, size=args.size)
    with TemporaryDirectory() as tmp:
        path = write_video(args.save_video or Path(tmp) / "demo.mp4", video.frames, fps=video.fps)
        print(f"video: synthetic seed {args.seed}, {args.frames} frames at {video.fps:g} fps "
              f"({args.frames / video.fps:.0f} s), {args.size}x{args.size}, written to {path}", flush=True)
        questions = args.ask or [video.question(kind).text for kind in QUESTION_TYPES]
        expected = None if args.ask else [video.question(kind).answer for kind in QUESTION_TYPES]
        if not args.probe:
            print("observers: the questions, known before the video (--probe: the probe prompt only, as a live "
                  "stream without standing questions)", flush=True)
        answers = answer_video(context, VideoFile(path).frames(fps=config.model.fps), questions,
                               query_aware=not args.probe, max_new_tokens=args.max_new_tokens,
                               on_fold=_progress(args.frames))
    correct = _deliver(context, "demo", questions, answers, expected)
    if expected:
        print(f"{correct}/{len(questions)} answers match the ground truth")
    print(_footer(context))
    return 0


def run(args: argparse.Namespace) -> int:
    config, given = _config(args)
    if not args.ask:
        raise InputError("give at least one question with --ask")
    from .state import has_state, load_state, save_state

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
        done = float(stream["last_time"])
        frames = (f for f in frames if f.time > done + 1e-6)
        print(f"resumed from {args.state}: {context.chunks_folded} chunks already folded, up to {done:.1f} s",
              flush=True)
    progress = _progress(None, source.duration())

    def on_fold(record) -> None:
        progress(record)
        if args.state and context.chunks_folded % args.save_every == 0:
            save_state(args.state, context, dict(video=video_id, last_time=record.time_span[1]))

    answers = answer_video(context, frames, args.ask, query_aware=args.query_aware,
                           max_new_tokens=args.max_new_tokens, on_fold=on_fold)
    if args.state and context.records and context.chunks_folded % args.save_every:  # else the last fold saved
        save_state(args.state, context, dict(video=video_id, last_time=context.records[-1].time_span[1]))
    _deliver(context, Path(args.video).name, args.ask, answers)
    print(_footer(context))
    return 0


def live(args: argparse.Namespace) -> int:
    from .config import MqttConfig, StreamConfig

    config, given = _config(args)
    mqtt = None
    if args.mqtt:
        mqtt = MqttConfig.parse(args.mqtt, username=args.mqtt_user, password=args.mqtt_password,
                                tls=args.mqtt_tls, ca_file=args.mqtt_ca)
    spec = StreamConfig(id=args.stream_id, source=args.url, format=args.format, ask=tuple(args.ask or ()),
                        standing=tuple(args.standing or ()), every=args.every,
                        jsonl=str(args.jsonl) if args.jsonl else None, state=str(args.state) if args.state else None,
                        save_every=args.save_every, buffer=args.buffer, max_waiting=args.max_waiting)
    questions = load_questions(args.questions) if args.questions else []
    return _serve(config, given, args, [spec], mqtt, questions)


def serve_config(args: argparse.Namespace) -> int:
    config, given = load_config(args.config), True
    if not config.streams:
        raise ConfigError(f"{args.config}: no streams: list them under 'streams:' (id, source, ...)")
    return _serve(config, given, args, list(config.streams), config.mqtt)


def _serve(config: Config, given: bool, args: argparse.Namespace, specs: list, mqtt, questions=()) -> int:
    import signal
    import threading

    from .questions import BadQuestion, Question, QueueFull
    from .service import LiveStream, serve

    adapter, settings, label = build_model(config, args.model, given)
    print(f"emloc-stream: {len(specs)} stream(s) [{', '.join(s.id for s in specs)}]; {label}", flush=True)
    streams = [LiveStream(spec, adapter, settings, fps=config.model.fps, mqtt=mqtt,
                          max_new_tokens=args.max_new_tokens, questions=questions if i == 0 else ())
               for i, spec in enumerate(specs)]
    if getattr(args, "stdin", False):
        queue = streams[0].queue

        def read_stdin() -> None:
            for line in sys.stdin:
                if line.strip():
                    try:
                        queue.submit(Question(queue.new_id(), line.strip(), origin="stdin"))
                    except (BadQuestion, QueueFull) as error:
                        print(f"question refused: {error}", file=sys.stderr, flush=True)
        threading.Thread(target=read_stdin, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # the fold under way finishes first
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve(streams, stop, status_every=args.status_every, duration=args.duration)
    for stream in streams:
        status = stream.runner.status
        print(f"stopped {stream.spec.id}: {status.frames_seen} frames, {status.chunks_folded} chunks, "
              f"{status.answers} answers", flush=True)
    return 0


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

    from .questions import QuestionQueue
    from .runtime import StreamRunner

    config, given = _config(args)
    videos = _batch_videos(args.videos)
    questions = load_questions(args.questions)
    done = {(a["stream_id"], a["question_id"]) for a in read_answers(args.out)}
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


def load_questions(path: str | Path) -> list:
    """A questions file: JSON Lines of {"id", "question", optional "video", "at", "expected"}."""
    import json

    from .questions import BadQuestion, Question

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise InputError(f"{path}: cannot read questions: {error.strerror or error}") from error
    out, ids = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise BadQuestion("each line must be a JSON object")
            unknown = set(data) - {"id", "question", "video", "at", "expected"}
            if unknown:
                raise BadQuestion(f"unknown field(s) {sorted(unknown)}")
            qid = str(data.get("id", f"q{number}"))
            if qid in ids:
                raise BadQuestion(f"duplicate id {qid!r}")
            ids.add(qid)
            meta = {k: data[k] for k in ("video", "expected") if k in data}
            out.append(Question(qid, data.get("question"), at=data.get("at"), origin="file", meta=meta))
        except (json.JSONDecodeError, BadQuestion) as error:
            raise InputError(f"{path}:{number}: {error}") from error
    if not out:
        raise InputError(f"{path}: no questions")
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="emloc-stream", description="Answer questions about long or endless "
                                     "video with an EMLoC-pruned multimodal LLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config (see configs/); default: the query-agnostic default "
                       "(configs/query_agnostic.yaml), its layer groups scaled to the model's depth")
        p.add_argument("--model", help=f"checkpoint folder or hub id of a Qwen2-VL / Qwen2.5-VL model "
                       f"(default: the shipped {DEFAULT_MODEL.relative_to(ROOT)}; {RANDOM_MODEL}: random weights)")
        p.add_argument("--ask", action="append", help="a question (repeatable)")
        p.add_argument("--budget", type=int, help="hard cap of tokens per layer")
        p.add_argument("--max-new-tokens", type=int, default=16)

    p = commands.add_parser("demo", help="generate a synthetic video, fold it, answer its questions (offline)")
    common(p)
    p.add_argument("--frames", type=int, default=256, help="length of the synthetic video (even, >= 16)")
    p.add_argument("--size", type=int, default=56, help="frame side in pixels (a multiple of 28)")
    p.add_argument("--seed", type=int, default=7, help="which synthetic video")
    p.add_argument("--save-video", type=Path, help="keep the generated video file here")
    p.add_argument("--probe", action="store_true", help="prune guided by the probe prompt instead of the questions")
    p.set_defaults(run=demo)

    p = commands.add_parser("run", help="fold a video file and answer questions about it")
    common(p)
    p.add_argument("video", help="video file (decord, else PyAV) or a folder of images")
    p.add_argument("--image-fps", type=float, default=2.0, help="frames per second of a folder of images")
    p.add_argument("--query-aware", action="store_true",
                   help="let the questions guide pruning (they are known before the video)")
    p.add_argument("--state", type=Path, help="save the stream state here; resume from it if present")
    p.add_argument("--save-every", type=int, default=1, help="chunks between saves of --state")
    p.set_defaults(run=run)

    p = commands.add_parser("batch", help="answer questions about many videos, resumable")
    common(p)
    p.add_argument("videos", help="a folder of videos, one video, or a text file listing videos")
    p.add_argument("--questions", required=True, help='JSON Lines: {"id", "question", optional "video", "at"}')
    p.add_argument("--out", required=True, type=Path, help="answers, JSON Lines; answered pairs are skipped")
    p.set_defaults(run=batch)

    p = commands.add_parser("live", help="watch a live source until stopped (Ctrl-C finishes cleanly)")
    common(p)
    p.add_argument("url", help="rtsp://, udp://, tcp://, http:// URL or a device such as /dev/video0")
    p.add_argument("--format", help="FFmpeg input format, e.g. v4l2 for a camera device")
    p.add_argument("--stream-id", default="cam", help="names the stream in answers and MQTT topics")
    p.add_argument("--standing", action="append", help="a question re-answered every --every chunks")
    p.add_argument("--every", type=int, default=1, help="chunks between answers to standing questions")
    p.add_argument("--stdin", action="store_true", help="read questions from standard input, one per line")
    p.add_argument("--questions", help='JSON Lines of {"id", "question", optional "at"} to ask this stream')
    p.add_argument("--jsonl", type=Path, help="also append answers to this JSON Lines file")
    p.add_argument("--mqtt", help="broker HOST:PORT: questions on emloc/<stream>/ask, answers, errors, status")
    p.add_argument("--mqtt-user")
    p.add_argument("--mqtt-password")
    p.add_argument("--mqtt-tls", action="store_true")
    p.add_argument("--mqtt-ca", help="CA file for the broker's TLS certificate (implies --mqtt-tls)")
    p.add_argument("--status-every", type=float, default=5.0, help="seconds between status reports")
    p.add_argument("--buffer", type=int, default=16, help="sampled frames held while folding; older ones drop")
    p.add_argument("--max-waiting", type=int, default=64, help="questions that may wait; more are refused")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--state", type=Path, help="save the stream state here; resume from it if present")
    p.add_argument("--save-every", type=int, default=1, help="chunks between saves of --state")
    p.set_defaults(run=live)

    p = commands.add_parser("serve", help="serve the live streams a config lists, sharing one model")
    p.add_argument("--config", required=True, help="YAML with streams: [{id, source, ...}] and optional mqtt:")
    p.add_argument("--model", help="overrides model.path of the config")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--status-every", type=float, default=5.0)
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(run=serve_config, budget=None)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, SettingsError, InputError, UnsupportedModelError, VideoError, ValueError,
            StateError) as error:
        print(f"emloc-stream: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
