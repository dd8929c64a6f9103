"""`live --stdin`: questions typed on standard input, one a line, asked of a stream."""

from __future__ import annotations

import sys
import threading

from .questions import BadQuestion, Question, QuestionQueue, QueueFull


def read_stdin_questions(queue: QuestionQueue, lines=None) -> threading.Thread:
    """Reads `lines` (default: standard input) in a daemon thread and submits each non-empty one to
    `queue`; a refused question is named on stderr and reading goes on."""

    def read() -> None:
        for line in sys.stdin if lines is None else lines:
            if line.strip():
                try:
                    queue.submit(Question(queue.new_id(), line.strip(), origin="stdin"))
                except (BadQuestion, QueueFull) as error:
                    print(f"question refused: {error}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=read, name="stdin-questions", daemon=True)
    thread.start()
    return thread
