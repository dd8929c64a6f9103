"""`emloc-stream live` (one live source) and `serve` (the streams a config lists), sharing one model.

The commands read their options and hand them to `stream/serving.py`, which runs the streams and the
services beside them."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .. import distributed
from ..config import Config, ConfigError, StreamConfig
from ..engine import load_task
from ..frigate import add_options as add_frigate_options
from ..question_files import load_questions
from .common import add_max_new_tokens_option, add_task_option, config_from

# live's flags that are fields of a config's stream (StreamConfig): None unless given, the field's default then
STREAM_FLAGS = ("every", "save_every", "buffer", "max_waiting", "max_scheduled", "max_standing", "horizon",
                "answers_per_fold")


def live(args: argparse.Namespace) -> int:
    from ..config import MqttConfig

    config = config_from(args)
    mqtt = None
    if args.mqtt:
        mqtt = MqttConfig.parse(args.mqtt, username=args.mqtt_user, password=args.mqtt_password,
                                tls=args.mqtt_tls, ca_file=args.mqtt_ca)
    given = {name: getattr(args, name) for name in STREAM_FLAGS if getattr(args, name) is not None}
    spec = StreamConfig(id=args.stream_id, source=args.url, format=args.format, ask=tuple(args.ask or ()),
                        standing=tuple(args.standing or ()), jsonl=str(args.jsonl) if args.jsonl else None,
                        state=str(args.state) if args.state else None, task=args.task or config.task,
                        **given)  # the flags not given: StreamConfig's defaults, as a config's stream has
    questions = load_questions(args.questions) if args.questions else []
    return _serve(config, args, [spec], mqtt, questions)


def serve_config(args: argparse.Namespace) -> int:
    if not args.config and not args.http:
        raise ConfigError("serve needs --config (the streams it serves) or --http (realtime sessions make the "
                          "streams: the page's camera, WebSocket /v1/realtime), or both")
    config = config_from(args)
    if not config.streams and not args.http:
        raise ConfigError(f"{args.config}: no streams: list them under 'streams:' (id, source, ...), or serve "
                          f"--http for realtime sessions only")
    default = args.task or config.task  # a stream's own task: wins
    specs = [replace(spec, task=spec.task or default) for spec in config.streams]
    for spec in specs:
        load_task(spec.task)  # a damaged pack is named before any model or source is opened
    if args.ray is not None:  # every stream a Ray actor on some node of the cluster
        from ..distributed.serve import serve_ray

        if not specs:
            raise ConfigError("--ray serves the streams a config lists: give --config with streams:")
        if config.frigate is not None:
            raise ConfigError("frigate: not with --ray (the bridge runs beside the streams it asks): serve without it")
        return serve_ray(args, replace(config, streams=tuple(specs)))
    return _serve(config, args, specs, config.mqtt)


def _serve(config: Config, args: argparse.Namespace, specs: list, mqtt, questions=()) -> int:
    """The options `live` and `serve` share, read into `serving.Services`; then `serving.serve_streams`."""
    from ..frigate import config_from as frigate_config_from
    from ..serving import Services, serve_streams

    services = Services(http=args.http, http_token=args.http_token,
                        http_limits=_http_limits(args) if args.http else None, ha_discovery=args.ha_discovery,
                        frigate=frigate_config_from(args, config.frigate, [spec.id for spec in specs]),
                        stdin=getattr(args, "stdin", False))
    return serve_streams(config, specs, mqtt, services, model=args.model, max_new_tokens=args.max_new_tokens,
                         status_every=args.status_every, duration=args.duration, questions=questions,
                         source_moved=getattr(args, "source_moved", False),
                         realtime_buffer=getattr(args, "buffer", None))


def _http_limits(args: argparse.Namespace):
    from ..http.guard import HttpLimits

    hosts = tuple(name for given in args.http_allow_host or () for name in given.split(","))
    folders, mb = tuple(getattr(args, "http_video_dir", None) or ()), getattr(args, "http_video_mb", None)
    for folder in folders:
        if not Path(folder).is_dir():
            raise ConfigError(f"--http-video-dir {folder}: not a folder")
    try:
        return HttpLimits(allowed_hosts=hosts, rate=args.http_rate, burst=max(1, round(2 * args.http_rate)),
                          head_timeout=args.http_timeout, body_timeout=args.http_timeout,
                          realtime_streams=getattr(args, "http_realtime_streams", HttpLimits.realtime_streams),
                          video_dirs=folders, video_remote=getattr(args, "http_video_remote", False),
                          max_video_bytes=HttpLimits.max_video_bytes if mb is None else round(mb * 2**20),
                          max_video_seconds=getattr(args, "http_video_seconds", HttpLimits.max_video_seconds))
    except ValueError as error:
        raise ConfigError(f"--http-rate/--http-timeout/--http-video-*: {error}") from error


def add_web_options(p: argparse.ArgumentParser) -> None:
    from ..http.guard import HttpLimits

    p.add_argument("--http", metavar="HOST:PORT", help="serve the REST API, the web page, /metrics and "
                   "/v1/chat/completions here (127.0.0.1 unless a token is set)")
    p.add_argument("--http-token", help="bearer token every endpoint but / and /health asks for "
                   "(default: $EMLOC_HTTP_TOKEN); required to bind beyond 127.0.0.1")
    p.add_argument("--http-allow-host", action="append", metavar="NAME", help="a Host name the server answers to "
                   "besides the bound address, localhost, 127.0.0.1 and [::1] (repeatable or comma-separated; '*': "
                   "any); other Hosts get 421, which stops DNS-rebinding pages")
    p.add_argument("--http-rate", type=float, default=HttpLimits.rate, help="requests per second one client (address) "
                   f"may send, bursts of twice that; beyond, 429 with Retry-After (default {HttpLimits.rate:g})")
    p.add_argument("--http-timeout", type=float, default=HttpLimits.head_timeout, help="seconds a request's head, and "
                   f"then its body, may take to arrive; beyond, 408 and the connection is closed (default "
                   f"{HttpLimits.head_timeout:g})")
    p.add_argument("--http-realtime-streams", type=int, default=HttpLimits.realtime_streams, help="streams that "
                   "realtime sessions (WebSocket /v1/realtime, the page's camera) may make, each with its own cache "
                   f"(default {HttpLimits.realtime_streams}; 0: none)")
    p.add_argument("--http-video-dir", action="append", metavar="DIR", help="a folder whose videos a chat request "
                   "may name by path in a video_url part (repeatable; none by default: only data: URLs)")
    p.add_argument("--http-video-remote", action="store_true", help="let a chat request's video_url be an "
                   "http(s):// or rtsp:// URL that this server fetches")
    p.add_argument("--http-video-mb", type=float, default=HttpLimits.max_video_bytes / 2**20, help="largest "
                   f"video_url video, in MiB (default {HttpLimits.max_video_bytes / 2**20:g}); beyond, 413")
    p.add_argument("--http-video-seconds", type=float, default=HttpLimits.max_video_seconds, help="longest "
                   f"video_url video, in seconds (default {HttpLimits.max_video_seconds:g}); beyond, 413")
    p.add_argument("--ha-discovery", action="store_true", help="announce standing questions to Home "
                   "Assistant as MQTT sensors (needs MQTT)")


def register(commands, common) -> None:
    p = commands.add_parser("live", help="watch a live source until stopped (Ctrl-C finishes cleanly)")
    common(p)
    p.add_argument("url", help="rtsp://, udp://, tcp://, http:// URL or a device such as /dev/video0")
    p.add_argument("--format", help="FFmpeg input format, e.g. v4l2 for a camera device")
    p.add_argument("--stream-id", default="cam", help="names the stream in answers and MQTT topics")
    p.add_argument("--standing", action="append", help="a question re-answered every --every chunks")
    p.add_argument("--every", type=int, help=f"chunks between answers to standing questions (default "
                   f"{StreamConfig.every})")
    p.add_argument("--stdin", action="store_true", help="read questions from standard input, one per line")
    p.add_argument("--questions", help='JSON Lines of {"id", "question", optional "at", "every", "wait"} '
                   "to ask this stream")
    p.add_argument("--jsonl", type=Path, help="also append answers to this JSON Lines file")
    p.add_argument("--mqtt", help="broker HOST:PORT: questions on emloc/<stream>/ask, answers, errors, status")
    p.add_argument("--mqtt-user", help="user name for the broker")
    p.add_argument("--mqtt-password", help="password for the broker")
    p.add_argument("--mqtt-tls", action="store_true", help="connect to the broker over TLS")
    p.add_argument("--mqtt-ca", help="CA file for the broker's TLS certificate (implies --mqtt-tls)")
    p.add_argument("--status-every", type=float, default=5.0, help="seconds between status reports")
    p.add_argument("--buffer", type=int, help=f"sampled frames held while folding; older ones drop (default "
                   f"{StreamConfig.buffer})")
    p.add_argument("--max-waiting", type=int, help=f"one-off questions that may wait; more are refused (default "
                   f"{StreamConfig.max_waiting})")
    p.add_argument("--max-scheduled", type=int, help=f'questions with "at" that may wait (apart; default '
                   f'{StreamConfig.max_scheduled})')
    p.add_argument("--max-standing", type=int, help=f"standing questions; more are refused until one is "
                   f"cancelled (emloc/<stream>/cancel; default {StreamConfig.max_standing})")
    p.add_argument("--horizon", type=float, help=f'how far (s) beyond the stream\'s time "at" may lie (default '
                   f'{StreamConfig.horizon:g})')
    p.add_argument("--answers-per-fold", type=int, help="while frames wait to be folded, at most this "
                   "many questions are answered between two folds (folding's guaranteed share; default "
                   f"{StreamConfig.answers_per_fold})")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--state", type=Path, help="save the stream state here; resume from it if present")
    p.add_argument("--save-every", type=int, help=f"chunks between saves of --state (default "
                   f"{StreamConfig.save_every})")
    p.add_argument("--source-moved", action="store_true", help="resume a --state folded from another URL (the "
                   "camera moved); without it such a state is refused")
    add_task_option(p)
    add_web_options(p)
    add_frigate_options(p)
    p.set_defaults(run=live)

    p = commands.add_parser(
        "serve", help="serve the live streams a config lists, sharing one model",
        description="Serves every stream a config lists (see configs/site.local.yaml, which runs with the "
        "shipped model, and configs/site.example.yaml): one model, one compressed cache per stream. A stream "
        "has an id and a source (a URL or device, with an optional FFmpeg format), and optionally questions "
        "(ask: answered once its first chunk is folded; standing: re-answered every `every` chunks), a "
        "jsonl file for its answers, a state folder (saved every save_every chunks and on exit, resumed on "
        "restart), a frame buffer and a limit of waiting questions. With an mqtt section, questions are taken "
        "on <prefix>/<id>/ask and answers, errors and status published beside it. Ctrl-C (or SIGTERM) "
        "finishes cleanly: the fold under way completes, waiting questions are answered, state is saved.")
    p.add_argument("--config", help="YAML config: emloc and model settings, streams: [{id, source, ...}] and "
                   "optional mqtt: (without it, or without streams, --http serves realtime sessions only)")
    p.add_argument("--model", help="checkpoint folder or hub id; overrides model.path of the config (default: "
                   "the config's, else the shipped stream/models/emloc-tiny-qwen2vl)")
    add_max_new_tokens_option(p)
    p.add_argument("--status-every", type=float, default=5.0,
                   help="seconds between status reports, on stderr and emloc/<id>/status (default 5)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--task", help="a task pack every stream starts from unless it names its own (task: in the "
                   "stream); overrides the config's top-level task:")
    add_web_options(p)
    distributed.options(p, "stream")
    p.add_argument("--state-dir", type=Path, help="with --ray: each stream's state in DIR/<id>, on storage every "
                   "node can read, saved every chunk; a stream whose node dies resumes from it elsewhere")
    p.set_defaults(run=serve_config, budget=None)
