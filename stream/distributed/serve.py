"""`serve --ray`: every camera stream a Ray actor, its state saved every chunk on shared storage.

A stream actor holds its own copy of the model and runs its stream (`LiveStream`: reader,
queue, MQTT bridge, sinks) in a thread, so Ray can call it for its status meanwhile. Its state
(compressed cache, positions, waiting and standing questions) goes to `--state-dir/<id>`
after every folded chunk and whenever its queue changes. When its node dies Ray starts the
actor again on a node with room (max_restarts), and the new one resumes from the last saved
state: the cache, the stream clock, the questions waiting. Its MQTT bridge reconnects under
the same client id with a persistent session, so questions published to it while no actor
was subscribed are held by the broker (QoS 1) and answered after the restart. The driver
reports where every stream runs and when one moves.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from ..config import Config, ConfigError
from ..signals import StopSignals
from .cluster import actor_options, connect, node_label, placement


class StreamActor:
    def __init__(self, spec, config: Config, model: str | None, status_every: float) -> None:
        from ..engine import build_model, check_task, load_task
        from ..service import LiveStream
        from ..state import has_state

        self.where = placement()
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if self.restarted and has_state(spec.state):  # its one-off config questions were saved if still waiting
            spec = replace(spec, ask=())
        adapter, settings, _ = build_model(config, model)
        task = load_task(spec.task)  # from the path, on storage every node can read; once per process
        check_task(spec.task, task, adapter, settings)
        self.stream = LiveStream(spec, adapter, settings, fps=config.model.fps, mqtt=config.mqtt,
                                 max_new_tokens=config.model.max_new_tokens, task=task)
        self.status_every, self.started = status_every, time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stream:{spec.id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = self.stream.start()
        saved = self._waiting()
        last_status = 0.0
        while not self._stop.is_set():
            stream.step(timeout=0.2)
            waiting = self._waiting()
            if waiting != saved and stream.runner.last_folded_time is not None:
                stream.save()  # a question accepted or answered: keep it across a node failure
                saved = waiting
            if time.monotonic() - last_status >= self.status_every:
                last_status = time.monotonic()
                self._publish_status()

    def _waiting(self) -> tuple:
        return tuple(q["id"] for q in self.stream.queue.snapshot())

    def _publish_status(self) -> dict:
        status = self.info()
        if self.stream.bridge is not None:
            self.stream.bridge.publish_status(status)
        return status

    def info(self) -> dict:
        """The stream's status and where it runs."""
        return dict(self.stream.status(), **self.where, restarted=self.restarted, up_since=self.started)

    def stop(self) -> dict:
        """Folds what is left, answers what waits, saves, flushes; returns the final status."""
        self._stop.set()
        self._thread.join()
        self.stream.close()
        return self.info()


def serve_ray(args: argparse.Namespace, config: Config) -> int:
    specs = []
    for spec in config.streams:
        if spec.state is None and args.state_dir is None:
            raise ConfigError(f"stream {spec.id}: serve --ray needs --state-dir (storage every node can read) "
                              f"or a state: folder for each stream, to restart it elsewhere")
        state = spec.state or str(Path(args.state_dir).resolve() / spec.id)
        specs.append(replace(spec, state=state, task=str(Path(spec.task).resolve()) if spec.task else None))
    cluster = connect(args.ray)
    print(f"emloc-stream serve --ray: {len(specs)} stream(s) on a cluster of {cluster}", flush=True)
    Actor = ray.remote(StreamActor)
    options = actor_options(args, max_restarts=-1, max_task_retries=-1, scheduling_strategy="SPREAD")
    actors = {spec.id: Actor.options(**options).remote(spec, config, args.model, args.status_every)
              for spec in specs}
    with StopSignals() as signals:  # the first signal stops the actors cleanly, a second one at once
        failed = _watch(args, actors, signals.event)
    return 1 if failed else 0


def _watch(args: argparse.Namespace, actors: dict, stop: threading.Event) -> list[str]:
    """Reports where each stream runs until `stop` (or --duration); then stops every actor. Returns the
    streams that failed to start."""
    where, lost, asked, failed = {}, {}, {}, []  # last placement; down since; info() calls in flight; failed
    started = time.monotonic()
    try:
        while not stop.is_set() and not (args.duration and time.monotonic() - started > args.duration):
            if not actors:
                break
            for sid, actor in list(actors.items()):
                if sid not in asked:
                    asked[sid] = actor.info.remote()
            ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=args.status_every)
            for sid in [s for s, call in asked.items() if call in ready]:
                try:
                    info = ray.get(asked.pop(sid))
                except RayActorError as error:  # its node died; Ray restarts it where there is room
                    if getattr(error, "actor_init_failed", False):  # it cannot start (bad source, state): no retry
                        print(f"{sid}: failed to start: {error}", file=sys.stderr, flush=True)
                        del actors[sid]
                        failed.append(sid)
                        continue
                    lost.setdefault(sid, time.monotonic())
                    print(f"{sid}: lost ({str(error).splitlines()[0][:200]}); Ray restarts it", file=sys.stderr,
                          flush=True)
                    continue
                here = (info["node_id"], info["pid"])
                if where.get(sid) != here:
                    down = f" after {time.monotonic() - lost.pop(sid):.1f} s down" if sid in lost else ""
                    verb = "restarted on" if info["restarted"] else "runs on"
                    print(f"{sid}: {verb} {node_label(info)}{down}", flush=True)
                    where[sid] = here
            for sid in asked:  # still no answer: its actor is down or restarting
                if sid in where and sid not in lost:
                    lost[sid] = time.monotonic()
                    print(f"{sid}: no reply from {where[sid][0][:8]}; waiting for it to come back", file=sys.stderr,
                          flush=True)
            stop.wait(min(1.0, args.status_every))
        if stop.is_set():
            print("emloc-stream: stopping: each stream folds what is left, answers waiting questions and saves "
                  "its state (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
    finally:
        try:
            finals = {sid: actor.stop.remote() for sid, actor in actors.items()}
            for sid, call in finals.items():
                try:
                    status = ray.get(call, timeout=120)
                    print(f"stopped {sid}: {status['frames_seen']} frames, {status['chunks_folded']} chunks, "
                          f"{status['answers']} answers, on {node_label(status)}", flush=True)
                except Exception as error:  # one stream's failure to stop must not keep the others from stopping
                    print(f"{sid}: could not stop cleanly: {error}", file=sys.stderr, flush=True)
        finally:  # a second Ctrl-C while they stop: kill them
            for actor in actors.values():
                ray.kill(actor, no_restart=True)
            ray.shutdown()
    return failed
