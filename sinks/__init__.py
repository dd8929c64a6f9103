"""Sinks deliver answers (console, JSON Lines, MQTT, ...). They only deliver."""

from .base import AnswerEvent, Sink
from .console import ConsoleSink
from .json_text import json_text, rounded
from .jsonl import JsonLinesSink, read_answers

__all__ = ["AnswerEvent", "ConsoleSink", "JsonLinesSink", "Sink", "json_text", "read_answers", "rounded"]
