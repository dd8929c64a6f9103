"""Ctrl-C (SIGINT) and SIGTERM: any command stops within seconds, saying so in one line.

A command run as a program (`emloc-stream`, `python -m stream`) takes both signals as
KeyboardInterrupt from its first line on (`handle_stop_signals`), so one that arrives while modules
load or the model is read ends the command like any other: `emloc-stream: interrupted`, exit status
130. An interrupt that lands inside a library's import can surface as another error (a half-imported
module); once a signal has come, whatever ends the command is reported as the interrupt.

Serving (`live`, `serve`) takes the first signal as a request to finish cleanly (`StopSignals`): the
fold under way completes, waiting questions are answered, state is saved. A second signal is an
interrupt. Once the command has returned after a signal, the process ends at once
(`exit_after_signal`): the interpreter's teardown of torch and the model takes seconds and has
nothing left to do.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPTED = "emloc-stream: interrupted"

_received = threading.Event()  # a stop signal came, in this process


def interrupt(number: int, frame) -> None:
    """The signal handler of a command: KeyboardInterrupt in the main thread, as Ctrl-C raises it."""
    _received.set()
    raise KeyboardInterrupt


def handle_stop_signals() -> None:
    """Installs `interrupt` for SIGINT and SIGTERM; for a command run as a program (a process of its own)."""
    for number in STOP_SIGNALS:
        signal.signal(number, interrupt)


def signal_received() -> bool:
    return _received.is_set()


def exit_after_signal(code: int) -> None:
    """Ends the process with `code` now if a stop signal came (output flushed, teardown skipped); else returns."""
    if not _received.is_set():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nobody reads any more
            pass
    os._exit(code)


class StopSignals:
    """While active (a context manager, main thread only), SIGINT and SIGTERM set `event`, which a serving
    loop watches to finish cleanly; once it is set, either is an `interrupt`. The previous handlers are
    put back on exit."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for number in STOP_SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.event.is_set():
            interrupt(number, frame)
        _received.set()
        self.event.set()  # the serving loop sees it within a step
