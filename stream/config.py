"""Typed configuration files: YAML in, validated dataclasses out; an unknown key is an error."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from emloc.settings import MAX_NEW_TOKENS, EMLoCSettings, SettingsError, preset


class ConfigError(ValueError):
    """A configuration file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelConfig:
    """path: a local checkpoint folder or hub id; None runs the shipped model.
    max_new_tokens: the longest answer in tokens."""

    path: str | None = None
    device: str | None = None
    fps: float = 2.0
    max_frame_pixels: int = 144 * 28 * 28
    max_new_tokens: int = MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"model.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise ConfigError(f"model.fps must be > 0, got {self.fps}")
        if isinstance(self.max_frame_pixels, bool) or not isinstance(self.max_frame_pixels, int) \
                or self.max_frame_pixels < 28 * 28:
            raise ConfigError(f"model.max_frame_pixels must be >= {28 * 28}, got {self.max_frame_pixels}")


@dataclass(frozen=True)
class MqttConfig:
    """The broker all streams talk to: questions on <prefix>/<stream>/ask, answers, errors, status."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None  # CA bundle for TLS (implies tls); the system's by default
    prefix: str = "emloc"
    max_payload: int = 8192  # bytes of an ask payload
    backoff: tuple[float, float] = (0.5, 8.0)  # first and longest wait between reconnects, seconds

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"mqtt.port must be an integer in 1..65535, got {self.port!r}")
        if not self.prefix or "#" in self.prefix or "+" in self.prefix:
            raise ConfigError(f"mqtt.prefix must be a plain topic prefix, got {self.prefix!r}")
        backoff = tuple(self.backoff)
        if len(backoff) != 2 or not 0 < backoff[0] <= backoff[1]:
            raise ConfigError(f"mqtt.backoff must be [first, longest] seconds, got {self.backoff!r}")
        object.__setattr__(self, "backoff", backoff)
        if self.ca_file:
            object.__setattr__(self, "tls", True)
        for name in ("username", "password"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"mqtt.{name} must be a non-empty string")
        if self.password is not None and self.username is None:
            raise ConfigError("mqtt.password is given without mqtt.username")
        if not isinstance(self.max_payload, int) or not 64 <= self.max_payload <= 1 << 20:
            raise ConfigError(f"mqtt.max_payload must be an integer of bytes in 64..1048576, got {self.max_payload!r}")
        if self.tls:
            self.ssl_context()  # a missing or unreadable CA file is named now, not inside the event loop

    def ssl_context(self):
        """The TLS context for the broker (the system's CAs unless ca_file); ConfigError if unusable."""
        import ssl

        if not self.tls:
            return None
        if self.ca_file is not None:
            path = Path(self.ca_file)
            if not path.is_file():
                raise ConfigError(f"mqtt.ca_file {self.ca_file}: no such file")
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"mqtt.ca_file {self.ca_file}: not a usable CA bundle (PEM): "
                              f"{getattr(error, 'reason', None) or error}") from error

    @classmethod
    def parse(cls, address: str, **options) -> MqttConfig:
        """From HOST or HOST:PORT."""
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "1883")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"MQTT broker must be HOST or HOST:PORT, got {address!r}")
        return cls(host=host, port=int(port), **options)


MAX_STREAM_ID_CHARS = 64


def check_stream_id(stream_id) -> str:
    """A stream id: 1 to 64 printable characters, none of them '/', '#', '+' or white space, so it is
    one plain MQTT topic level and one URL path segment; ConfigError in one line otherwise."""
    if not isinstance(stream_id, str) or not stream_id or len(stream_id) > MAX_STREAM_ID_CHARS \
            or not stream_id.isprintable() or any(c in stream_id for c in "/#+") \
            or any(c.isspace() for c in stream_id):
        shown = repr(stream_id)[:40] + ("..." if len(repr(stream_id)) > 40 else "")
        raise ConfigError(f"stream id must be 1 to {MAX_STREAM_ID_CHARS} printable characters without '/', '#', "
                          f"'+' or spaces, got {shown}" + (f" ({len(stream_id)} characters)"
                                                            if isinstance(stream_id, str) else ""))
    return stream_id


@dataclass(frozen=True)
class StreamConfig:
    """One live stream: a URL or device, its questions and where its answers go."""

    id: str
    source: str
    format: str | None = None  # FFmpeg input format, e.g. v4l2
    ask: tuple[str, ...] = ()  # answered once the first chunk is folded
    standing: tuple[str, ...] = ()  # re-answered every `every` chunks
    every: int = 1
    jsonl: str | None = None
    state: str | None = None  # folder to save the stream's state in and resume from
    task: str | None = None  # a task pack the stream starts from (default: the config's task:, else none)
    save_every: int = 1
    buffer: int = 16
    max_waiting: int = 64  # one-off questions waiting; more are refused
    max_scheduled: int = 64  # questions with "at" waiting, counted apart so they cannot starve one-offs
    max_standing: int = 8  # standing questions; more are refused until one is cancelled
    horizon: float = 3600.0  # how far (s) beyond the stream's time "at" may lie
    answers_per_fold: int = 2  # one-off/scheduled answers between two folds while frames wait (folding's share)

    def __post_init__(self) -> None:
        check_stream_id(self.id)
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"stream {self.id}: source must be a URL or device path")
        for name in ("every", "save_every", "buffer", "max_waiting", "max_scheduled", "max_standing",
                     "answers_per_fold"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"stream {self.id}: {name} must be an integer >= 1, got {value!r}")
        if len(self.standing) > self.max_standing:
            raise ConfigError(f"stream {self.id}: {len(self.standing)} standing questions, more than max_standing "
                              f"({self.max_standing})")
        if len(self.ask) > self.max_scheduled:
            raise ConfigError(f"stream {self.id}: {len(self.ask)} questions to ask, more than max_scheduled "
                              f"({self.max_scheduled})")
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, (int, float)) or not 0 < self.horizon < 1e9:
            raise ConfigError(f"stream {self.id}: horizon must be a number of seconds > 0, got {self.horizon!r}")
        if self.task is not None and (not isinstance(self.task, str) or not self.task.strip()):
            raise ConfigError(f"stream {self.id}: task must be the path of a task pack, got {self.task!r}")
        for name in ("ask", "standing"):
            value = getattr(self, name)
            if not all(isinstance(q, str) and q.strip() for q in value):
                raise ConfigError(f"stream {self.id}: {name} must be a list of questions")
            object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class Config:
    emloc: EMLoCSettings = field(default_factory=EMLoCSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    mqtt: MqttConfig | None = None
    streams: tuple[StreamConfig, ...] = ()
    task: str | None = None  # the task pack every stream starts from unless it names its own (--task overrides)
    frigate: dict | None = None  # the Frigate bridge's section, read and checked by stream/frigate.py

    def __post_init__(self) -> None:
        if self.task is not None and (not isinstance(self.task, str) or not self.task.strip()):
            raise ConfigError(f"task must be the path of a task pack, got {self.task!r}")


def load_config(path: str | Path) -> Config:
    """Reads a YAML config. `emloc.preset` names a preset whose values the other keys override."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except (ConfigError, SettingsError, TypeError) as error:
        raise ConfigError(f"{path}: {error}") from error


def config_from_dict(data: dict) -> Config:
    _check_keys("config", data, {f.name for f in fields(Config)})
    emloc = _section(data, "emloc", "preset, token_budget, ...")
    _check_keys("emloc", emloc, {f.name for f in fields(EMLoCSettings)} | {"preset"})
    name = emloc.pop("preset", None)
    settings = preset(name, **emloc) if name else EMLoCSettings.from_dict(emloc)
    model = _section(data, "model", "path, fps, ...")
    _check_keys("model", model, {f.name for f in fields(ModelConfig)})
    mqtt = None
    if data.get("mqtt") is not None:
        if not isinstance(data["mqtt"], dict):
            raise ConfigError("mqtt must be a mapping (host, port, ...)")
        _check_keys("mqtt", data["mqtt"], {f.name for f in fields(MqttConfig)})
        mqtt = MqttConfig(**data["mqtt"])
    streams = data.get("streams") or []
    if not isinstance(streams, list):
        raise ConfigError("streams must be a list of streams")
    parsed = []
    for i, stream in enumerate(streams):
        if not isinstance(stream, dict):
            raise ConfigError(f"streams[{i}] must be a mapping")
        _check_keys(f"streams[{i}]", stream, {f.name for f in fields(StreamConfig)})
        if "id" not in stream or "source" not in stream:
            raise ConfigError(f"streams[{i}] needs an id and a source")
        parsed.append(StreamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stream.items()}))
    ids = [s.id for s in parsed]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"stream ids must be unique, got {ids}")
    return Config(emloc=settings, model=ModelConfig(**model), mqtt=mqtt, streams=tuple(parsed), task=data.get("task"),
                  frigate=data.get("frigate"))


def _section(data: dict, name: str, example: str) -> dict:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping ({example})")
    return dict(value)


def _check_keys(section: str, data: dict, known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {section}; known keys are {sorted(known)}")
