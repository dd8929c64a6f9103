"""Sinks deliver answers (console, JSON Lines, MQTT, ...). They only deliver."""

from .base import AnswerEvent, Sink
from .console import ConsoleSink

__all__ = ["AnswerEvent", "ConsoleSink", "Sink"]
