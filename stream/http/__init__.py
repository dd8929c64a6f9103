"""The HTTP side of `live` and `serve` (`--http HOST:PORT`): REST API, server-sent events, an
OpenAI-compatible chat endpoint, a web page and Prometheus metrics. Needs the `[http]` extra."""

from .guard import HttpLimits
from .server import TOKEN_ENV, BindError, HttpServer, parse_bind

__all__ = ["TOKEN_ENV", "BindError", "HttpLimits", "HttpServer", "parse_bind"]
