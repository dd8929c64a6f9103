"""A serving process: live streams on one model, and the services beside them, until stopped.

`live` (one source named on the command line) and `serve` (the streams a config lists) both run

    check what was asked for (before the model loads: a taken port or a damaged state should
    not wait for it) -> build the model -> the streams -> the services beside them (HTTP,
    Frigate, Home Assistant, questions on stdin) -> serve until Ctrl-C, SIGTERM or --duration
    -> stop the services, and say what each stream did.

Each service is wired in its own module (`stream/http/`, `frigate.py`, `ha.py`, `stdin_questions.py`,
`signals.py`); the streams themselves, with their MQTT bridges, are `service.LiveStream`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, ConfigError, MqttConfig, StreamConfig
from .engine import build_model, check_output, check_state, check_task, load_task, model_name, print_model_note
from .questions import Question

if TYPE_CHECKING:
    from .frigate import FrigateConfig
    from .http.guard import HttpLimits


@dataclass(frozen=True)
class Services:
    """What runs beside the streams, as the command asked for it.

    http: HOST:PORT of the REST API, the page, /metrics, the OpenAI and realtime endpoints (None: none);
        http_token and http_limits with it.
    ha_discovery: the standing questions as Home Assistant sensors (needs MQTT).
    frigate: Frigate's events, asked about over the streams.
    stdin: questions read from standard input, one a line, for the first stream.
    """

    http: str | None = None
    http_token: str | None = None
    http_limits: HttpLimits | None = None
    ha_discovery: bool = False
    frigate: FrigateConfig | None = None
    stdin: bool = False

    def check(self, mqtt: MqttConfig | None) -> None:
        """What can be refused before the model loads."""
        if self.http:
            from .http.server import check_bind

            check_bind(self.http, self.http_token)
        if self.ha_discovery and mqtt is None:
            raise ConfigError("--ha-discovery publishes to MQTT: give --mqtt HOST:PORT (or mqtt: in the config)")


def serve_streams(config: Config, specs: list[StreamConfig], mqtt: MqttConfig | None, services: Services, *,
                  model: str | None, max_new_tokens: int, status_every: float, duration: float | None,
                  questions: list[Question] = (), source_moved: bool = False,
                  realtime_buffer: int | None = None) -> int:
    """Serves `specs` (and realtime sessions' streams, with HTTP) on one model until stopped; the exit
    status: 0, or 1 when a stream's last save failed. questions: for the first stream.
    realtime_buffer: frames a realtime session's stream holds (default: a stream's)."""
    from .service import LiveStream, serve
    from .signals import StopSignals

    services.check(mqtt)
    for spec in specs:
        check_state(spec.state, f"stream {spec.id}: state" if len(specs) > 1 else "--state")
        check_output(spec.jsonl, f"stream {spec.id}: jsonl" if len(specs) > 1 else "--jsonl")
    packs = {spec.id: load_task(spec.task) for spec in specs}  # one TaskPack per file, shared by its streams
    adapter, settings, label = build_model(config, model)
    for spec in specs:
        check_task(spec.task, packs[spec.id], adapter, settings)
    print(f"emloc-stream: {len(specs)} stream(s) [{', '.join(s.id for s in specs)}]; {label}", flush=True)
    print_model_note(adapter.model_note)
    for spec in specs:
        if spec.task:
            print(f"{spec.id} starts from {spec.task}: {packs[spec.id].describe()}", flush=True)
    streams = [LiveStream(spec, adapter, settings, fps=config.model.fps, mqtt=mqtt, max_new_tokens=max_new_tokens,
                          questions=questions if i == 0 else (), task=packs[spec.id], source_moved=source_moved)
               for i, spec in enumerate(specs)]

    def open_realtime_stream(stream_id: str) -> LiveStream:  # a realtime session's: frames pushed over WebSocket
        from .pushed import PushedFrames

        spec = StreamConfig(id=stream_id, source=f"realtime:{stream_id}")
        return LiveStream(spec, adapter, settings, fps=config.model.fps, max_new_tokens=max_new_tokens,
                          source=PushedFrames(fps=config.model.fps, buffer=realtime_buffer or spec.buffer))

    if services.stdin:
        from .stdin_questions import read_stdin_questions

        read_stdin_questions(streams[0].queue)
    videos = None
    if services.http:  # chat requests with a video_url: folded by the one video job, on this model
        from .http.video import VideoAnswerer

        videos = VideoAnswerer(adapter, settings, fps=config.model.fps, max_new_tokens=max_new_tokens,
                               limits=services.http_limits, name=Path(model_name(config, model)).name)
    http = _start_http(services, streams, open_realtime_stream, videos)
    frigate = None
    if services.frigate is not None:  # its settings become the bridge that asks the streams
        from .frigate import FrigateBridge

        frigate = FrigateBridge(services.frigate, streams, answer_prefix=mqtt.prefix if mqtt else "emloc",
                                ha_discovery=services.ha_discovery).start()
    if services.ha_discovery:
        from .ha import announce

        announce(streams, mqtt)
    try:
        with StopSignals() as signals:  # the fold under way finishes first; a second signal stops at once
            serve(streams, signals.event, status_every=status_every, duration=duration)
    finally:
        if http is not None:
            http.stop()
        if frigate is not None:
            frigate.stop()
    for stream in streams:
        status = stream.runner.status
        print(f"stopped {stream.spec.id}: {status.frames_seen} frames, {status.chunks_folded} chunks, "
              f"{status.answers} answers", flush=True)
    unsaved = [stream for stream in streams if stream.unsaved]  # its last save failed: say so in the exit status
    for stream in unsaved:
        print(f"{stream.spec.id}: {stream.unsaved}", file=sys.stderr, flush=True)
    return 1 if unsaved else 0


def _start_http(services: Services, streams: list, open_stream, videos):
    if not services.http:
        return None
    try:
        from .http import HttpServer

        server = HttpServer(streams, services.http, services.http_token, limits=services.http_limits,
                            open_stream=open_stream, videos=videos)
    except ImportError as error:  # FastAPI, uvicorn, ... are an optional extra
        raise ConfigError(f"--http needs the http extra: pip install 'emloc-stream[http]' ({error})") from error
    server.start()
    print(f"emloc-stream: HTTP on {server.url} (API docs at {server.url}/docs)", flush=True)
    return server
