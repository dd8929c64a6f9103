"""What every sink receives: one answered question, as plain data."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AnswerEvent:
    """An answer and where it stands in its stream.

    time_span: (first, last) second of the stream the cache covers, if known.
    cache_tokens: tokens per layer the answer was computed over.
    model_note: what the model's checkpoint says of itself (`ModelAdapter.model_note`: the shipped models
        understand only synthetic video); absent from the JSON of a checkpoint that says nothing.
    """

    stream_id: str
    question_id: str
    question: str
    answer: str
    time_span: tuple[float, float] | None
    wall_time: float
    cache_tokens: int
    latency_s: float
    expected: str | None = None
    model_note: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.model_note is None:
            del data["model_note"]
        return data


class Sink(ABC):
    @abstractmethod
    def deliver(self, event: AnswerEvent) -> None:
        """Hands one answer on; raises if it could not."""

    def close(self) -> None:  # noqa: B027 - most sinks hold nothing
        """Flushes and releases whatever the sink holds."""
