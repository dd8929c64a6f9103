"""Runs the app with uvicorn in a thread beside the serving loop; refuses a non-loopback bind without a token.

uvicorn runs with the limits of `HttpLimits`: h11 with a deadline on request heads, the
keep-alive idle timeout, a cap on open connections (503 beyond) and h11's cap on a head's size; WebSockets
(realtime sessions) with wsproto, a message past 4 x `max_message` closing its connection (1009)."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading

from .guard import HttpLimits, head_timeout_protocol

TOKEN_ENV = "EMLOC_HTTP_TOKEN"


class BindError(ValueError):
    """A --http address that cannot or must not be used; the message says why."""


def parse_bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:  # just a port: loopback
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BindError(f"--http wants HOST:PORT with a port from 1 to 65535, got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(bind: str, token: str | None) -> tuple[tuple[str, int], str | None]:
    """The address and the token (given, else from the environment); BindError for a public address
    without a token, or one that cannot be listened on (a port taken, an address not of this machine).
    Cheap: the CLI checks before it loads a model."""
    host, port = parse_bind(bind)
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise BindError(f"serving HTTP on {host} (beyond this machine) needs a bearer token: pass "
                        f"--http-token or set {TOKEN_ENV}")
    _check_listen(host, port)
    return (host, port), token


def _check_listen(host: str, port: int) -> None:
    """Binds and lets go of `host`:`port` as the server will (SO_REUSEADDR, as uvicorn sets it), so a taken
    port is named now, not after the model has loaded."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            probe.listen(1)
    except OSError as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise BindError(f"the HTTP server could not start on {host}:{port}: {reason}") from None


MAX_HEAD_BYTES = 16 * 1024  # a request line and headers beyond this get 400 (h11)


class HttpServer:
    def __init__(self, streams: list, bind: str = "127.0.0.1:8080", token: str | None = None,
                 limits: HttpLimits | None = None, open_stream=None, videos=None) -> None:
        """open_stream(id): a new stream for a realtime session (see realtime.py); it joins `streams`.
        videos: the VideoAnswerer of chat requests with a video_url (video.py), or None."""
        (self.host, self.port), token = check_bind(bind, token)
        import uvicorn

        from .app import create_app

        limits = limits or HttpLimits()
        self.app = create_app(streams, token=token, limits=limits, bound=self.host, open_stream=open_stream,
                              videos=videos)
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=2,
                                http=head_timeout_protocol(limits.head_timeout), ws="wsproto",
                                ws_max_size=4 * limits.max_message,  # beyond max_message: an error event
                                ws_per_message_deflate=False,  # frames are JPEG/PNG already; no inflate bombs
                                timeout_keep_alive=limits.idle_timeout, limit_concurrency=limits.max_connections,
                                h11_max_incomplete_event_size=MAX_HEAD_BYTES)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> HttpServer:
        self.thread.start()
        waited = 0.0
        while not self.server.started and self.thread.is_alive() and waited < timeout:
            threading.Event().wait(0.05)
            waited += 0.05
        if not self.server.started:
            raise BindError(f"the HTTP server could not start on {self.host}:{self.port} (is the port taken?)")
        logging.getLogger("emloc_stream").info("http: serving on %s", self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
