"""`batch --ray`: videos spread over a pool of Ray actors, each holding the model; the driver writes.

Each worker actor loads the model once and answers one video per call (`VideoJob.answer`, as the local
batch does, with the same flags).
The driver hands a video to whichever worker is free, and it alone appends answers to the
JSON Lines file, skipping any (video, question) already there, so every pair is written
exactly once however often a video is retried or the batch rerun. A video whose call fails
(the video cannot be read, or its worker's node died) goes back in the queue, at most
`--retries` more times; the others go on. A worker whose node died is replaced by a new actor,
started wherever there is room, which joins the pool once it is up; a replacement not up within
`--revive-timeout` seconds is given up and another one started, given twice as long (a start can
hang on a node that died but is not yet known dead; waiting on it without a deadline once stalled
a whole batch; the doubling keeps a slow but healthy start from being killed forever).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, deque
from dataclasses import replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..job import VideoJob
from .cluster import actor_options, connect, node_label, placement


class VideoWorker:
    """One model, many videos: the model is loaded when the actor starts (or restarts)."""

    def __init__(self, config, model: str | None, query_aware: bool, task: str | None = None) -> None:
        from ..engine import build_model, check_task, load_task

        self.adapter, self.settings, self.label = build_model(config, model)
        self.task = load_task(task)  # from the path, on storage every node can read; once per worker
        check_task(task, self.task, self.adapter, self.settings)
        self.fps, self.max_new_tokens = config.model.fps, config.model.max_new_tokens
        self.query_aware = query_aware
        self.where = placement()

    def ready(self) -> dict:
        """Where it runs, and the note its model's checkpoint carries (the driver prints it, as batch does)."""
        return dict(where=self.where, model_note=self.adapter.model_note)

    def answer(self, job: VideoJob) -> dict:
        started = time.monotonic()
        answered = job.answer(self.adapter, self.settings, fps=self.fps, query_aware=self.query_aware,
                              max_new_tokens=self.max_new_tokens, task=self.task)
        return dict(answers=[event.to_dict() for event in answered.events], where=self.where,
                    seconds=time.monotonic() - started)


def run_batch(args: argparse.Namespace, config, jobs: list[tuple[VideoJob, str | None]], questions: int,
              task: str | None = None) -> int:
    """jobs: `batch_jobs`'s, each with why it is skipped or None; questions: how many the batch has."""
    from sinks import AnswerEvent, ConsoleSink, JsonLinesSink

    from ..engine import print_model_note

    todo = deque(job for job, skipped in jobs if skipped is None)
    done = set()  # (stream id, question id) written: each exactly once, however often a video is retried
    total = len(todo)
    print(f"emloc-stream batch --ray: {len(jobs)} videos, {questions} questions; "
          f"{len(jobs) - total} already answered, {total} to do", flush=True)
    if not todo:
        return 0
    cluster = connect(args.ray)
    per = max(args.cpus_per_worker, 1e-3)
    count = args.workers or max(1, int(cluster.get("CPU", 1) / per + 1e-9))
    count = min(count, total)
    Worker = ray.remote(VideoWorker)
    # No Ray restarts: the driver replaces a lost worker itself, so that it can put a deadline on the start.
    options = actor_options(args, max_restarts=0, max_task_retries=0)
    workers = []
    idle, running, reviving = [], {}, {}  # running: call -> (worker, video); reviving: ready() call -> (worker, wait)

    def start(wait: float | None = None) -> None:
        """A new worker; a replacement (`wait` seconds) is given up if not up by then."""
        worker = Worker.options(**options).remote(config, args.model, args.query_aware, task)
        workers.append(worker)
        reviving[worker.ready.remote()] = (worker, None if wait is None else (wait, time.monotonic() + wait))

    for _ in range(count):
        start()  # a first start has no deadline of its own (a big model may load for minutes): --worker-timeout
    print(f"{count} worker(s) of {args.cpus_per_worker:g} CPU, {args.gpus_per_worker:g} GPU"
          + (f", {args.resources}" if args.resources else "") + f" on a cluster of {cluster}", flush=True)
    sinks = [JsonLinesSink(args.out), ConsoleSink()]
    attempts, failed, retried, finished = Counter(), [], 0, 0
    noted = False  # the model note is printed once, when the first worker is up (the driver loads no model)
    started, last_alive = time.monotonic(), time.monotonic()

    def line(text: str) -> None:
        minutes = (time.monotonic() - started) / 60
        print(f"[{finished}/{total} videos, {len(failed)} failed, {retried} retried, "
              f"{finished / minutes if minutes else 0:.1f} videos/min] {text}", flush=True)

    try:
        while todo or running:
            while todo and idle:
                worker, job = idle.pop(), todo.popleft()  # the path resolved: a worker's directory may be another
                running[worker.answer.remote(replace(job, path=job.path.resolve()))] = (worker, job)
            if running or idle:
                last_alive = time.monotonic()
            elif not reviving or time.monotonic() - last_alive > args.worker_timeout:
                why = "no worker could start" if not reviving else f"no worker up for {args.worker_timeout:g} s"
                for job in todo:
                    failed.append((job.path, why))
                todo.clear()
                break
            ready, _ = ray.wait(list(running) + list(reviving), num_returns=1, timeout=1.0)
            now = time.monotonic()
            for call, (worker, wait) in list(reviving.items()):
                if call not in ready and wait is not None and now > wait[1]:
                    del reviving[call]
                    ray.kill(worker, no_restart=True)
                    print(f"a replacement worker was not up after {wait[0]:g} s: starting another "
                          f"(given {2 * wait[0]:g} s)", file=sys.stderr, flush=True)
                    start(2 * wait[0])
            for call in ready:
                if call in reviving:
                    worker, _ = reviving.pop(call)
                    try:
                        up = ray.get(call)
                        idle.append(worker)
                        print(f"worker up on {node_label(up['where'])}", flush=True)
                        if not noted:
                            print_model_note(up["model_note"])
                        noted = True
                    except RayActorError as error:
                        print(f"a worker could not start: {_short(error)}", file=sys.stderr, flush=True)
                        if not getattr(error, "actor_init_failed", False):  # its node died while it started
                            start(args.revive_timeout)
                    except RayTaskError as error:
                        print(f"a worker could not start: {_short(error)}", file=sys.stderr, flush=True)
                    continue
                worker, job = running.pop(call)
                try:
                    result = ray.get(call)
                except RayActorError as error:  # its node or process died: a new worker replaces it
                    ray.kill(worker, no_restart=True)
                    start(args.revive_timeout)
                    why = f"worker lost ({_short(error)})"
                    retried += _retry(todo, attempts, failed, job, args.retries, why)
                    continue
                except RayTaskError as error:  # the video itself failed (unreadable, ...)
                    idle.append(worker)
                    retried += _retry(todo, attempts, failed, job, args.retries, _short(error))
                    continue
                idle.append(worker)
                written = 0
                for answer in result["answers"]:
                    key = (answer["stream_id"], answer["question_id"])
                    if key in done:  # already written: exactly once
                        continue
                    done.add(key)
                    answer["time_span"] = tuple(answer["time_span"]) if answer["time_span"] else None
                    event = AnswerEvent(**answer)
                    for sink in sinks:
                        sink.deliver(event)
                    written += 1
                finished += 1
                line(f"{job.path}: {written} answers in {result['seconds']:.1f} s on {node_label(result['where'])}")
    finally:
        for sink in sinks:
            sink.close()
        for worker in workers:
            ray.kill(worker)
        ray.shutdown()
    minutes = (time.monotonic() - started) / 60
    print(f"emloc-stream batch --ray: {finished} videos answered, {len(failed)} failed, {retried} retries, "
          f"{finished / minutes if minutes else 0:.1f} videos/min", flush=True)
    for path, why in failed:
        print(f"failed: {path}: {why}; its questions stay unanswered, a rerun retries it", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _retry(todo: deque, attempts: Counter, failed: list, job: VideoJob, retries: int, why: str) -> int:
    path = job.path
    attempts[path] += 1
    if attempts[path] <= retries:
        print(f"{path}: attempt {attempts[path]} failed: {why}; retrying", file=sys.stderr, flush=True)
        todo.appendleft(job)  # next, so work lost with a node is redone first
        return 1
    failed.append((path, f"{attempts[path]} attempts failed, the last: {why}"))
    print(f"{path}: failed after {attempts[path]} attempts: {why}", file=sys.stderr, flush=True)
    return 0


def _short(error: Exception) -> str:
    if isinstance(error, RayTaskError) and error.cause is not None:
        return f"{type(error.cause).__name__}: {error.cause}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if getattr(error, "actor_init_failed", False) and lines:  # the worker's own error ends the traceback
        return lines[-1][:500]
    return lines[0][:300] if lines else type(error).__name__

