"""JSON from an untrusted client, parsed with limits: every transport's questions (MQTT payloads, HTTP
bodies, lines of a questions file) are read by `read_json`, so each limit and its message is the same
whichever way a question came.

Limits: the size in bytes, the nesting depth (counted before parsing, so no recursion), the digits of
a number, a key given twice (which JSON would otherwise settle silently, last one wins), and text that
is not UTF-8 or holds unpaired surrogates. What a field may hold is the schema's (`Question.from_dict`).
"""

from __future__ import annotations

import json

from .questions import BadQuestion

MAX_DEPTH = 8  # nesting of arrays/objects (a question needs 1)
MAX_NUMBER_CHARS = 32  # digits of one JSON number
MAX_LINE_BYTES = 1 << 20  # one line of a questions file (the largest MQTT payload a config allows)


def read_json(payload: bytes | str, max_bytes: int) -> dict:
    """A JSON object from untrusted bytes (or text); BadQuestion naming what is wrong."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if len(payload) > max_bytes:
        raise BadQuestion(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadQuestion(f"not JSON: not UTF-8 text ({error.reason} at byte {error.start})") from None
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise BadQuestion(f"JSON nests {depth} levels deep; the limit is {MAX_DEPTH}")
    try:
        data = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant,
                          object_pairs_hook=_object)
    except json.JSONDecodeError as error:
        raise BadQuestion(f"not JSON: {error}") from None
    if not isinstance(data, dict):
        raise BadQuestion(f"a question must be a JSON object, got {type(data).__name__}")
    return data


def _depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _int(digits: str) -> int:
    if len(digits) > MAX_NUMBER_CHARS:
        raise BadQuestion(f"a number of {len(digits)} digits; the limit is {MAX_NUMBER_CHARS}")
    return int(digits)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise BadQuestion(f"a number of {len(text)} characters; the limit is {MAX_NUMBER_CHARS}")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadQuestion(f"the number {text} is out of range")
    return value


def _constant(name: str):
    raise BadQuestion(f"{name} is not a number JSON allows")


def _object(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise BadQuestion(f"field {key!r} appears twice")
        for text in (key, value):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadQuestion("a string holds an unpaired surrogate (\\ud800-\\udfff)") from None
        out[key] = value
    return out
