"""Answers as JSON Lines: one object per answer, flushed as it is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import AnswerEvent, Sink
from .json_text import json_text


class JsonLinesSink(Sink):
    """Appends each answer to `path` as one JSON object on its own line.

    Each line is written whole and flushed (fsync'ed when `sync`), so a killed run leaves
    only complete lines behind, and `batch` can read them to resume.
    """

    def __init__(self, path: str | Path, sync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        _drop_torn_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def deliver(self, event: AnswerEvent) -> None:
        self._file.write(json_text(event.to_dict()) + "\n")
        self._file.flush()
        if self.sync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_answers(path: str | Path) -> list[dict]:
    """The complete answers in a JSON Lines file; a torn last line (a killed writer) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break  # the writer was killed mid-line
            raise ValueError(f"{path}:{number}: not a JSON line: {error}") from error
    return out


def _drop_torn_line(path: Path) -> None:
    """Cuts a last line left unfinished by a killed writer, so appending starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
