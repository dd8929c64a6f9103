"""JSON as the product writes it (answer files, MQTT, Home Assistant, Frigate, HTTP, server-sent events,
WebSocket): times rounded to the millisecond.

Float arithmetic leaves times such as 48.50000000000001 s; every writer goes through `json_text` (FastAPI's
responses through `rounded`, in stream/http/app.py), so every output shows 48.5. A time is a float under a
key that names one: `time`, `at`, `every`, `time_span`, or a key ending in `_time` (wall_time, stream_time,
start_time) or `_s` (latency_s, lag_s: seconds); a list under such a key has its floats rounded. Other floats
(scales, shares) are written as they are. A saved state's manifest is not written here: resuming compares
frame times with its times exactly (and the cache file holds the same times under its checksum).
"""

from __future__ import annotations

import json

TIME_DECIMALS = 3  # milliseconds
TIME_KEYS = frozenset({"time", "at", "every", "time_span"})


def is_time(key) -> bool:
    return isinstance(key, str) and (key in TIME_KEYS or key.endswith(("_time", "_s")))


def rounded(data, time: bool = False):
    """`data` with the floats of its times rounded to TIME_DECIMALS (a copy; `data` is left as it is)."""
    if isinstance(data, float):
        return round(data, TIME_DECIMALS) if time else data
    if isinstance(data, dict):
        return {key: rounded(value, is_time(key)) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [rounded(value, time) for value in data]
    return data


def json_text(data, **options) -> str:
    """`data` as JSON text, its times rounded; non-ASCII characters are written as themselves (UTF-8)."""
    return json.dumps(rounded(data), ensure_ascii=False, **options)
