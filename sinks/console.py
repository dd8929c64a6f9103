"""Answers printed for a person."""

from __future__ import annotations

import sys
from typing import TextIO

from .base import AnswerEvent, Sink


class ConsoleSink(Sink):
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def deliver(self, event: AnswerEvent) -> None:
        span = f" [{event.time_span[0]:.1f}-{event.time_span[1]:.1f}s]" if event.time_span else ""
        expected = f"   (expected: {event.expected})" if event.expected is not None else ""
        print(f"{event.stream_id}{span} Q: {event.question}\n  A: {event.answer or '(no answer)'}{expected}"
              f"\n  over {event.cache_tokens} tokens/layer, {1000 * event.latency_s:.0f} ms", file=self.out, flush=True)
