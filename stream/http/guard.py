"""What stands between the network and the app: limits on every request, whoever sends it.

`HttpLimits` holds the settings (the CLI flags are derived from it). `Guard` is a plain ASGI
middleware (no BaseHTTPMiddleware: it must see the body's bytes and the client's disconnect) that,
in this order,
- answers 421 to a `Host` not on the allow-list (DNS rebinding: a web page the user visits must
  not reach this loopback server under its own name), HTTP and WebSocket alike;
- answers 429 with `Retry-After` to a client (by peer address) past its request rate;
- answers 401 without the bearer token, when one is set (a WebSocket may offer it as the subprotocol
  `bearer.<token>`: browsers cannot set its headers);
- refuses a WebSocket whose `Origin` (sent by browsers) is not an allowed host: browsers let any
  page open a WebSocket anywhere, so without this a page the user visits could feed a camera here;
- reads the body itself, counting the bytes actually received whatever the framing
  (Content-Length or chunked): 413 as soon as they pass `max_body`, 408 when the body is not all
  there within `body_timeout`; both close the connection, so nothing more of that body is read.
  The app then reads the body from memory, and the client's disconnect as usual.
`head_timeout_protocol` adds to uvicorn's h11 protocol what uvicorn lacks: a deadline for a
request's head (request line and headers), so a half-sent request cannot hold a connection.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

OPEN_PATHS = {"/", "/health"}  # everything else wants the token, when one is set
CHAT_PATH = "/v1/chat/completions"  # its body may hold a video (HttpLimits.body_limit)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_TRACKED_CLIENTS = 10_000  # rate buckets held; the least recently seen go first


@dataclass(frozen=True)
class HttpLimits:
    max_body: int = 64 * 1024  # bytes of a request body
    head_timeout: float = 10.0  # seconds from a request's first byte to the end of its headers
    body_timeout: float = 10.0  # seconds to receive a whole request body
    idle_timeout: float = 5.0  # seconds a kept-alive connection may wait for its next request
    max_connections: int = 256  # open connections (and requests in progress); beyond, 503
    rate: float = 50.0  # requests per second one client (peer address) may send, sustained
    burst: int = 100  # requests one client may send at once
    client_share: float = 0.25  # the fraction of a stream's one-off queue one client may hold
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides the bound address and loopback; "*": any
    max_message: int = 4 * 2**20  # bytes of one WebSocket event; beyond, an error event (4x: the connection closes)
    max_frame_bytes: int = 2 * 2**20  # bytes of one realtime frame (JPEG or PNG)
    max_frame_pixels: int = 4096 * 4096  # pixels of one realtime frame
    realtime_streams: int = 4  # streams realtime sessions may make (each holds a cache)
    video_dirs: tuple[str, ...] = ()  # folders whose videos a chat request may name by path (video_url)
    video_remote: bool = False  # whether a chat request may name an http(s):// or rtsp:// video for the server to fetch
    max_video_bytes: int = 32 * 2**20  # bytes of one video_url video (sent, fetched or named)
    max_video_seconds: float = 600.0  # seconds of one video_url video
    max_video_pixels: int = 1920 * 1080  # pixels of one of its frames (a chunk holds its frames at full size)
    video_queue: int = 2  # video_url jobs waiting beside the one running; beyond, 429

    def __post_init__(self) -> None:
        for name in ("head_timeout", "body_timeout", "idle_timeout", "rate", "max_video_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        for name in ("max_body", "max_connections", "burst", "max_message", "max_frame_bytes", "max_frame_pixels",
                     "max_video_bytes", "max_video_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.video_queue, int) or self.video_queue < 0:
            raise ValueError(f"video_queue must be an integer >= 0, got {self.video_queue!r}")
        if not isinstance(self.realtime_streams, int) or self.realtime_streams < 0:
            raise ValueError(f"realtime_streams must be an integer >= 0, got {self.realtime_streams!r}")
        if not 0 < self.client_share <= 1:
            raise ValueError(f"client_share must lie in (0, 1], got {self.client_share!r}")
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in self.allowed_hosts if h.strip()))
        object.__setattr__(self, "video_dirs", tuple(self.video_dirs))

    def body_limit(self, path: str) -> int:
        """Bytes a request body to `path` may have: a chat request may carry a video as a base64 data: URL."""
        if path == CHAT_PATH:
            return self.max_body + 4 * (self.max_video_bytes + 2) // 3
        return self.max_body

    def hosts_for(self, bound: str) -> frozenset[str] | None:
        """The Host names served when bound to `bound`; None: any."""
        if "*" in self.allowed_hosts:
            return None
        names = {*LOOPBACK_NAMES, *self.allowed_hosts}
        if bound not in ("0.0.0.0", "::", ""):
            names.add(bound.lower())
        return frozenset(names)


def error_response(status: int, message: str, headers: dict | None = None):
    """Errors in one shape that plain clients (`detail`) and OpenAI clients (`error.message`) both read."""
    from starlette.responses import JSONResponse  # here: the CLI reads HttpLimits without the http extra

    kind = "authentication_error" if status == 401 else "not_found_error" if status == 404 else \
        "rate_limit_error" if status == 429 else "invalid_request_error"
    return JSONResponse({"detail": message, "error": {"message": message, "type": kind, "code": status}},
                        status_code=status, headers=headers)


def client_of(connection) -> str:
    """Who asks, for rate limits and queue shares: the peer address of a request or WebSocket."""
    return connection.client.host if connection.client else "unknown"


def host_name(value: str) -> str:
    """The name part of a Host header: 'Example.com:80' -> 'example.com', '[::1]:8080' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name
    try:  # a bare IPv6 address
        return str(ipaddress.IPv6Address(value))
    except ValueError:
        return value


class RateLimiter:
    """A token bucket per client: `burst` requests at once, `rate` per second sustained."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def wait_for(self, client: str, now: float | None = None) -> float:
        """0 if the client may go on now (and takes a token), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
        return wait


class Guard:
    """The ASGI middleware (see the module's docstring); `bound` is the address served on."""

    def __init__(self, app, limits: HttpLimits, token: str | None = None, bound: str = "127.0.0.1") -> None:
        self.app, self.limits, self.token = app, limits, token
        self.hosts = limits.hosts_for(bound)
        self.rates = RateLimiter(limits.rate, limits.burst)
        self.big_bodies = 0  # bodies past max_body being read or served (see _read_body)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            if scope["type"] == "websocket":  # refused instead of the handshake, with the same status and detail
                await receive()
                if "websocket.http.response" in scope.get("extensions", {}):
                    return await refusal(scope, receive, send)
                return await send({"type": "websocket.close", "code": 1008, "reason": refusal.body.decode()[:120]})
            return await refusal(scope, receive, send)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        big = []  # holds True while this request holds one of the slots for bodies past max_body
        try:
            body = await self._read_body(scope, receive, send, big)
            if body is None:
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the client's disconnect
            await self.app(scope, replay, send)
        finally:
            self.big_bodies -= len(big)

    def _refusal(self, scope):
        """The response refusing this request, or None to serve it."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return error_response(421, f"Host {host[:100]!r} is not served here (the allowed hosts are "
                                       f"{sorted(self.hosts)}; add one with --http-allow-host)",
                                  {"Connection": "close"})
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.rates.wait_for(client)
        if wait:
            return error_response(429, f"too many requests from {client}: the limit is {self.limits.rate:g} per "
                                       f"second (bursts of {self.limits.burst}); retry after the Retry-After "
                                       f"seconds", {"Retry-After": str(math.ceil(wait))})
        origin = headers.get(b"origin", b"").decode("latin-1")
        if scope["type"] == "websocket" and origin and self.hosts is not None \
                and host_name(origin.partition("://")[2].partition("/")[0]) not in self.hosts:
            return error_response(403, f"a WebSocket from origin {origin[:100]!r} is not served here (the allowed "
                                       f"hosts are {sorted(self.hosts)})")
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scope["type"] == "websocket" and not value:
                scheme, value = "bearer", next((p[len("bearer."):] for p in scope.get("subprotocols") or ()
                                                if p.startswith("bearer.")), "")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return error_response(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                                      {"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, scope, receive, send, big: list) -> bytes | None:
        """The whole body, or None once a refusal was sent (or the client left). A body past max_body (a video,
        on the chat path) takes one of a few slots first (`big` says it holds one), so such bodies in memory
        at once are bounded too: 503 when none is free."""
        limit = self.limits.body_limit(scope["path"])
        video = (f" (a video of up to {self.limits.max_video_bytes} bytes, as base64, and {self.limits.max_body} bytes "
                 f"more)" if limit > self.limits.max_body else "")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            await self._close_with(400, f"Content-Length {length[:40].decode('latin-1')!r} is not a number of "
                                        f"bytes", scope, receive, send)
            return None
        if length is not None and int(length) > limit:
            await self._close_with(413, f"request body of {int(length)} bytes exceeds the limit of {limit}{video}",
                                   scope, receive, send)
            return None
        deadline = time.monotonic() + self.limits.body_timeout
        parts, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self._close_with(408, f"the request body did not arrive within "
                                            f"{self.limits.body_timeout:g} s ({size} bytes came)", scope, receive,
                                       send)
                return None
            if message["type"] != "http.request":  # the client left
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body and not big:
                if self.big_bodies > self.limits.video_queue:
                    await self._close_with(503, f"{self.big_bodies} request bodies of videos are in memory already "
                                                f"(the limit is {self.limits.video_queue + 1}); retry later", scope,
                                           receive, send, {"Retry-After": "5"})
                    return None
                self.big_bodies += 1
                big.append(True)
            if size > limit:
                await self._close_with(413, f"request body exceeds the limit of {limit} bytes{video} (refused after "
                                            f"{size} bytes)", scope, receive, send)
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _close_with(self, status: int, message: str, scope, receive, send, headers=None) -> None:
        """A refusal that also ends the connection: the rest of the body is never read."""
        await error_response(status, message, {"Connection": "close", **(headers or {})})(scope, receive, send)


def head_timeout_protocol(head_timeout: float):
    """uvicorn's h11 protocol with a deadline on each request's head: a connection that has not sent a
    whole request line and headers `head_timeout` s after it opened (or after its first byte of a
    following request) gets 408 and is closed. uvicorn's own keep-alive timeout only covers a
    connection that sends nothing at all between requests."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    said = b"the request head (request line and headers) did not arrive in time\n"
    timeout_reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(said)) + said

    class HeadTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_deadline = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first byte of a following request
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._disarm()  # the next request's first byte arms it again
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, event) -> None:
            self._disarm()  # the connection is a WebSocket's from here: a 408 written into it would corrupt it
            super().handle_websocket_upgrade(event)

        def _arm(self) -> None:
            self._head_cycle = self.cycle
            self._head_deadline = self.loop.call_later(head_timeout, self._head_expired)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_expired(self) -> None:
            self._head_deadline = None
            if self.cycle is self._head_cycle and not self.transport.is_closing():  # no new request began
                self.transport.write(timeout_reply)
                self.transport.close()

    return HeadTimeoutH11Protocol
