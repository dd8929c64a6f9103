"""`emloc-stream live` (one live source) and `serve` (the streams a config lists), sharing one model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..config import Config, ConfigError, load_config
from .common import build_model, config_from, load_questions


def live(args: argparse.Namespace) -> int:
    from ..config import MqttConfig, StreamConfig

    config, given = config_from(args)
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
    if args.ray is not None:  # every stream a Ray actor on some node of the cluster
        from ..distributed.serve import serve_ray

        return serve_ray(args, config)
    return _serve(config, given, args, list(config.streams), config.mqtt)


def _serve(config: Config, given: bool, args: argparse.Namespace, specs: list, mqtt, questions=()) -> int:
    import signal
    import threading

    from ..questions import BadQuestion, Question, QueueFull
    from ..service import LiveStream, serve

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


def register(commands, common) -> None:
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
    distributed.options(p, "stream")
    p.add_argument("--state-dir", type=Path, help="with --ray: each stream's state in DIR/<id>, on storage every "
                   "node can read, saved every chunk; a stream whose node dies resumes from it elsewhere")
    p.set_defaults(run=serve_config, budget=None)
