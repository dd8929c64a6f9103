"""Live streams served by one process: one model, one compressed cache per stream.

Every stream has its own source reader thread (which drops frames rather than fall
behind), question queue, sinks, optional MQTT bridge and optional saved state. The
serving loop visits the streams in turn and folds whatever each has ready, so the model
runs one forward at a time and its weights are shared. A stream whose source dies is
reported on its status and reconnected by its reader; a stream whose fold fails is
reported and the others go on.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from emloc import ModelAdapter, StreamContext
from emloc.settings import MAX_NEW_TOKENS
from sinks import ConsoleSink, JsonLinesSink, Sink

from .config import ConfigError, MqttConfig, StreamConfig
from .live import LiveSource
from .mqtt import MqttBridge
from .questions import BadQuestion, DuplicateId, Question, QuestionQueue, QueueFull
from .runtime import StreamRunner
from .state import StateError, StateNotSaved, check_source, has_state, load_state, save_state, source_fingerprint

log = logging.getLogger("emloc_stream")


class LiveStream:
    def __init__(self, spec: StreamConfig, adapter: ModelAdapter, settings, *, fps: float,
                 mqtt: MqttConfig | None = None, max_new_tokens: int = MAX_NEW_TOKENS, console: bool = True,
                 questions: list[Question] = (), task=None, source_moved: bool = False, source=None) -> None:
        """source_moved: resume a state folded from another URL (the camera moved); else that is refused.
        source: frames from elsewhere than `spec.source` (a realtime session's `PushedFrames`)."""
        self.spec, self.fps = spec, fps
        self.source_moved = source_moved
        self.unsaved = ""  # why the last save failed; "" once one succeeds (folding goes on, saves are retried)
        self.context = StreamContext(adapter, settings=settings, task=task)  # task: a TaskPack, shared read-only
        self.queue = QuestionQueue(max_waiting=spec.max_waiting, max_scheduled=spec.max_scheduled,
                                   max_standing=spec.max_standing, horizon=spec.horizon)
        self.sinks: list = [ConsoleSink()] if console else []
        if spec.jsonl:
            self.sinks.append(JsonLinesSink(spec.jsonl))
        self.bridge = None
        if mqtt is not None:
            self.bridge = MqttBridge(mqtt, spec.id, self.queue)
            self.sinks.append(self.bridge)
        self.runner = StreamRunner(spec.id, self.context, self.queue, self.sinks, max_new_tokens=max_new_tokens,
                                   on_error=self.report_error, on_fold=self._on_fold,
                                   source_state=lambda: self.status()["state"],
                                   behind=lambda: self.source.waiting() > 0, answers_per_fold=spec.answers_per_fold)
        start_time = self._resume() if spec.state and has_state(spec.state) else 0.0
        first_chunk = start_time + settings.chunk_frames / fps
        for text in spec.ask:
            self.queue.submit(Question(self.queue.new_id(), text, at=first_chunk, origin="config"))
        restored = {q["question"] for q in self.queue.snapshot() if q["every"]}
        for text in spec.standing:  # a resumed stream already holds its standing questions
            if text not in restored:
                self.queue.submit(Question(self.queue.new_id(), text, every=spec.every, origin="config"))
        for question in questions:  # from a questions file: one-off, or scheduled with "at"
            try:
                self.queue.submit(question)
            except DuplicateId as error:
                if not error.same:  # else: restored from the saved state, still waiting
                    raise ConfigError(f"stream {spec.id}: question {question.id!r}: {error}") from error
            except (BadQuestion, QueueFull) as error:
                raise ConfigError(f"stream {spec.id}: question {question.id!r}: {error}") from error
        self.source = source if source is not None else \
            LiveSource(spec.source, fps=fps, format=spec.format, buffer=spec.buffer, start_time=start_time)
        self.failed = ""
        self.newest_frame = None  # the newest frame fed (what a web page shows)
        self.listeners: list = []  # told of folds and errors (see `subscribe`)

    def _resume(self) -> float:
        stream = load_state(self.spec.state, self.context)
        if stream.get("stream_id") != self.spec.id:
            raise StateError(f"{self.spec.state}: this state belongs to stream {stream.get('stream_id')!r}, "
                             f"not {self.spec.id!r}")
        note = check_source(self.spec.state, stream.get("source"), source_fingerprint(self.spec.source, live=True),
                            moved_ok=self.source_moved)
        if note:
            print(f"{self.spec.id}: {note}", file=sys.stderr, flush=True)
        questions = stream.get("questions", [])
        try:
            if not isinstance(questions, list):
                raise BadQuestion("'questions' is not a list")
            for data in questions:
                self.queue.submit(Question.from_dict(data, "state"))
        except (BadQuestion, QueueFull) as error:
            raise StateError(f"{self.spec.state}: a saved question cannot be restored: {error}") from error
        last_time = float(stream["last_time"])
        self.runner.status_from_context()  # the restored stream, not an empty one
        self.runner.status.stream_time = self.runner.last_folded_time = self.queue.now = last_time
        print(f"{self.spec.id}: resumed from {self.spec.state}: {self.context.chunks_folded} chunks folded, up to "
              f"{stream['last_time']:.1f} s, {len(stream.get('questions', []))} questions restored", flush=True)
        return last_time + 1 / self.fps

    def save(self) -> None:
        """Saves the state; a save that cannot be written (full disk, read-only folder) is reported as "state not
        saved" (the fold itself succeeded, the previous state is intact) and retried after the next fold."""
        if self.spec.state and self.runner.last_folded_time is not None:
            try:
                save_state(Path(self.spec.state), self.context, dict(
                    stream_id=self.spec.id, source=source_fingerprint(self.spec.source, live=True),
                    last_time=self.runner.last_folded_time, questions=self.queue.snapshot()))
            except StateNotSaved as error:
                if not self.unsaved:  # once, not every chunk; the status carries it meanwhile
                    self.report_error(None, f"{error}; folding goes on, the save is retried every chunk")
                self.unsaved = str(error)
                return
            if self.unsaved:
                print(f"{self.spec.id}: state saved again in {self.spec.state}", file=sys.stderr, flush=True)
            self.unsaved = ""

    def _on_fold(self, runner: StreamRunner) -> None:
        if self.context.chunks_folded % self.spec.save_every == 0 or self.unsaved:
            self.save()
        self._tell("on_fold", self.context.records[-1])

    def subscribe(self, listener) -> None:
        """Adds a listener (the HTTP server, Home Assistant discovery): if it is a Sink it gets every answer;
        if it has `on_fold(record)` or `on_error(question_id, message)` it is told of those too."""
        if isinstance(listener, Sink):
            self.sinks.append(listener)
            self.runner.sinks.append(listener)
        self.listeners.append(listener)

    def _tell(self, name: str, *args) -> None:
        for listener in self.listeners:
            method = getattr(listener, name, None)
            if method is not None:
                try:
                    method(*args)
                except Exception as error:  # a listener must never stop the stream
                    log.error("%s: listener %s failed: %s", self.spec.id, type(listener).__name__, error)

    def report_error(self, question_id: str | None, message: str) -> None:
        print(f"{self.spec.id}: {'question ' + question_id + ': ' if question_id else ''}{message}",
              file=sys.stderr, flush=True)
        if self.bridge:
            self.bridge.publish_error(message, question_id)
        self._tell("on_error", question_id, message)

    def start(self, stop: threading.Event | None = None) -> LiveStream:
        """Connects the MQTT bridge and starts reading; stop: set (Ctrl-C), waiting for the broker ends."""
        if self.bridge:  # refused credentials or TLS: one line now, not a retry loop
            self.bridge.start().check_connect(stop=stop)
        self.source.start()
        return self

    def step(self, timeout: float) -> bool:
        """Feeds one ready frame (or answers what is due); True if a frame was folded in."""
        frame = self.source.get(timeout=timeout)
        try:
            if frame is not None:
                self.newest_frame = frame
                self.runner.feed(frame)
            else:
                self.runner.poll()
            self.failed = ""
        except Exception as error:  # this stream's fold failed: report it, keep serving the others
            self.failed = f"{type(error).__name__}: {error}"
            self.report_error(None, f"fold failed: {self.failed}")
        return frame is not None

    def status(self) -> dict:
        status = self.runner.status
        status.frames_dropped = self.source.dropped
        status.lag_s = round(max(0.0, (self.source.newest_time or 0.0) - (status.stream_time or 0.0)), 2)
        status.detail = ""
        if self.source.state == "reconnecting":
            status.state, status.detail = "reconnecting", self.source.last_error
        elif self.failed:
            status.state, status.detail = "failed", self.failed
        elif self.unsaved:
            status.detail = self.unsaved
        elif self.source.state == "connected" and status.state == "starting":
            status.state = "running"
        if not status.detail and self.source.state == "connected" and self.source.awaiting_keyframe \
                and self.source.skipped_packets:  # a camera with a long keyframe interval, joined mid-GOP
            status.detail = f"waiting for a keyframe ({self.source.skipped_packets} undecodable packets skipped)"
        return status.to_dict()

    def publish_status(self) -> dict:
        status = self.status()
        if self.bridge:
            self.bridge.publish_status(status)
        print(f"status {self.spec.id}: {status['state']}, {status['frames_seen']} frames, "
              f"{status['chunks_folded']} chunks, {status['cache_tokens']} tokens/layer, lag {status['lag_s']:.1f} s, "
              f"dropped {status['frames_dropped']}" + (f" ({status['detail']})" if status["detail"] else "")
              + (f", from task pack {self.spec.task}" if self.spec.task else ""),
              file=sys.stderr, flush=True)
        return status

    def close(self) -> None:
        """Stops reading, folds what is left, answers what waits, saves, flushes the sinks."""
        self.source.stop()
        try:
            self.runner.finish()
        finally:
            self.save()
            if self.bridge:
                self.bridge.publish_status(self.status())
            for sink in self.sinks:
                sink.close()


def serve(streams: list[LiveStream], stop: threading.Event, *, status_every: float = 5.0,
          duration: float | None = None) -> None:
    """Runs until `stop` is set (Ctrl-C) or `duration` seconds pass; then closes every stream."""
    for stream in streams:
        stream.start(stop)
    started = last_status = time.monotonic()
    try:
        while not stop.is_set() and not (duration and time.monotonic() - started > duration):
            if not streams:  # realtime sessions only (see stream/http/realtime.py), none yet
                stop.wait(0.1)
            wait = 0.2 / max(1, len(streams))  # realtime sessions add streams as it runs
            for stream in streams:  # one forward at a time: the weights are shared
                stream.step(timeout=wait)
            if time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                for stream in streams:
                    stream.publish_status()
        if stop.is_set():
            print("emloc-stream: stopping: folding what is left, answering waiting questions, saving state "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
    finally:
        for stream in streams:  # every reader told at once: silent cameras' readers are waited for together
            stream.source.stop(wait=0)
        for stream in streams:
            try:
                stream.close()
            except Exception as error:  # one stream's failure to close must not lose the others' answers
                log.error("%s: closing failed: %s", stream.spec.id, error)
