"""Realtime sessions over WebSocket (`/v1/realtime`): a client streams its camera's frames into a stream of
its own and asks questions about what it has seen; answers, errors and status come back as events.

The events are modelled on OpenAI's Realtime API and vLLM's realtime-video proposal (RFC #38141,
PR #39642: `input_video_frame.append` / `commit`), so a client written for either needs little change.
Every event is one JSON text message with a `type` (and an optional `event_id`, echoed by the error
it causes).

Client -> server
- `input_video_frame.append` `{"image": base64 JPEG or PNG (or a data: URL), "timestamp"?: seconds}`;
  without timestamps a frame's arrival time counts (one or the other for a whole session).
- `input_video_frame.commit` `{}`: answered by `input_video_frame.committed` (what was received so far).
- `response.create` `{"response": {"question": text, "at"?: stream seconds, "every"?: chunks, "id"?, "wait"?}}`:
  the question schema of every transport (`Question.from_dict`), as `POST /streams/{id}/questions` takes it
  (one-off, scheduled or standing; `wait` is true unless given: asked before the first frame, it waits).
- `response.cancel` `{"response_id"}`: withdraws a waiting or standing question of this session.

Server -> client
- `session.created` `{"session": {id, stream_id, fps, chunk_frames, limits}}`, first.
- `input_video_frame.committed`; `input_video_frame.folded` `{chunk, frames, time_span, cache_tokens}`
  when a chunk of the stream's frames is in the cache (`time_span`: the video time the cache now covers).
- `response.created` `{"response": {id, status, kind, question}}`; then per answer
  `response.output_text.done` `{response_id, text, time_span, cache_tokens, latency_s, model_note?}`
  (`model_note`: what the checkpoint says of itself, as in every answer's JSON; the shipped models'); then
  `response.done` `{"response": {id, status: completed | cancelled | failed}}` (a standing question's
  only when it is cancelled).
- `stream.status` every second: the stream's status (`frames_dropped` counts the oldest waiting
  frames dropped when folding lags, as for every live source).
- `error` `{"error": {type, code, message, event_id?, response_id?}}`: a bad event (undecodable frame,
  unknown type, oversized message, too many events a second) costs that event only; the session lives.

The connection passes the Guard like every request (Host, rate, bearer token: browsers, which cannot
set headers on a WebSocket, offer it as the subprotocol `bearer.<token>` beside `realtime`). A
session's stream (`?model=ID`, else a new id) outlives the session: a new session with that id goes on
where the last stopped, and REST, SSE, the page and `/v1/chat/completions` see it like any stream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import uuid

import numpy as np
from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect

from sinks import json_text

from ..config import ConfigError, check_stream_id
from ..pushed import FrameRefused, PushedFrames
from ..questions import BadQuestion, Question
from .guard import HttpLimits, RateLimiter, client_of
from .hub import StreamHub

router = APIRouter()
SUBPROTOCOL = "realtime"  # what browsers offer beside `bearer.<token>`; OpenAI's browser clients do the same
EVENT_FIELDS = {  # the fields each client event may carry besides `type` and `event_id`
    "input_video_frame.append": {"image", "timestamp"},
    "input_video_frame.commit": set(),
    "response.create": {"response"},
    "response.cancel": {"response_id"},
}
JPEG, PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


class SessionRefused(Exception):
    """A session that cannot begin (its stream taken, too many streams); the message says why."""


class Realtime:
    """The streams realtime sessions made, and the one way to make another: `open_stream(id)` builds a
    `LiveStream` whose source is a `PushedFrames` (the command that serves knows the model and settings);
    it joins `streams`, the list the serving loop goes through, and gets a hub like every stream."""

    def __init__(self, open_stream, streams: list, hubs: dict, metrics, limits: HttpLimits) -> None:
        self.open_stream, self.streams, self.hubs, self.metrics, self.limits = \
            open_stream, streams, hubs, metrics, limits
        self.made: set[str] = set()  # ids of the streams made here
        self.attached: set[str] = set()  # ids with a session now

    def begin(self, stream_id: str | None) -> StreamHub:
        stream_id = stream_id or f"rt-{uuid.uuid4().hex[:8]}"
        try:
            check_stream_id(stream_id)
        except ConfigError as error:
            raise SessionRefused(f"model (the stream id): {error}") from None
        if stream_id in self.attached:
            raise SessionRefused(f"stream {stream_id!r} has a realtime session already")
        if stream_id in self.hubs and stream_id not in self.made:
            raise SessionRefused(f"stream {stream_id!r} reads its own source; a realtime session feeds a stream of "
                                 f"its own: choose another model id")
        if stream_id not in self.hubs:
            if len(self.made) >= self.limits.realtime_streams:
                raise SessionRefused(f"this server holds {len(self.made)} realtime streams, its limit "
                                     f"(--http-realtime-streams); join one of them ({sorted(self.made)}) by its id")
            stream = self.open_stream(stream_id)
            hub = StreamHub(stream, self.metrics, client_share=self.limits.client_share)
            hub.attach(asyncio.get_running_loop())
            stream.start()
            self.hubs[stream_id] = hub
            if self.metrics is not None:
                self.metrics.hubs.append(hub)
            self.made.add(stream_id)
            self.streams.append(stream)  # the serving loop folds it from its next round on
        self.attached.add(stream_id)
        hub = self.hubs[stream_id]
        hub.stream.source.open()
        return hub

    def end(self, hub: StreamHub) -> None:
        hub.stream.source.close(f"its realtime session ended; a session with ?model={hub.id} goes on with it")
        self.attached.discard(hub.id)


def decode_frame(image, limits: HttpLimits) -> np.ndarray:
    """An `input_video_frame.append`'s image as (H, W, 3) uint8 RGB; FrameRefused naming the problem."""
    from PIL import Image

    if not isinstance(image, str) or not image:
        raise FrameRefused("'image' must be a non-empty base64 string (a JPEG or PNG, or a data: URL of one)")
    if image.startswith("data:"):
        header, _, image = image.partition(",")
        if header.lower() not in ("data:image/jpeg;base64", "data:image/png;base64"):
            raise FrameRefused(f"a data: URL must be 'data:image/jpeg;base64,...' or 'data:image/png;base64,...', "
                               f"got {header[:40]!r}")
    if len(image) > 4 * math.ceil(limits.max_frame_bytes / 3) + 4:
        raise FrameRefused(f"the image is about {len(image) * 3 // 4} bytes; the limit is {limits.max_frame_bytes}")
    try:
        raw = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise FrameRefused("'image' is not valid base64") from None
    if len(raw) > limits.max_frame_bytes:
        raise FrameRefused(f"the image is {len(raw)} bytes; the limit is {limits.max_frame_bytes}")
    kind = "JPEG" if raw.startswith(JPEG) else "PNG" if raw.startswith(PNG) else None
    if kind is None:
        raise FrameRefused(f"the image is neither JPEG nor PNG (it starts with {raw[:8].hex()})")
    try:
        with Image.open(io.BytesIO(raw), formats=[kind]) as opened:
            width, height = opened.size
            if width * height > limits.max_frame_pixels:
                raise FrameRefused(f"the image is {width}x{height}; the limit is {limits.max_frame_pixels} pixels")
            return np.asarray(opened.convert("RGB"))
    except FrameRefused:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise FrameRefused(f"the {kind} image does not decode: {error}") from None


class Session:
    """One WebSocket connection feeding one stream (see the module's docstring)."""

    def __init__(self, websocket: WebSocket, hub: StreamHub, limits: HttpLimits, client: str) -> None:
        self.websocket, self.hub, self.limits, self.client = websocket, hub, limits, client
        self.source: PushedFrames = hub.stream.source
        self.rates = RateLimiter(limits.rate, limits.burst)
        self.responses: dict[str, str] = {}  # this session's question ids -> kind
        self._send_lock = asyncio.Lock()

    async def send(self, event: dict) -> None:
        async with self._send_lock:
            await self.websocket.send_text(json_text(event))

    async def error(self, code: str, message: str, event_id=None, kind: str = "invalid_request_error",
                    **more) -> None:
        body = dict(type=kind, code=code, message=message)
        if isinstance(event_id, str):
            body["event_id"] = event_id[:128]
        await self.send({"type": "error", "error": dict(body, **more)})

    async def run(self) -> None:
        settings = self.hub.stream.context.settings
        await self.send({"type": "session.created", "session": dict(
            id=f"sess-{uuid.uuid4().hex[:12]}", object="realtime.session", stream_id=self.hub.id,
            fps=self.hub.stream.fps, chunk_frames=settings.chunk_frames, limits=dict(
                max_frame_bytes=self.limits.max_frame_bytes, max_frame_pixels=self.limits.max_frame_pixels,
                max_message_bytes=self.limits.max_message, events_per_second=self.limits.rate))})
        events = self.hub.listen(kinds=("answer", "error", "status", "fold"))
        forward = asyncio.create_task(self._forward(events))
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self._take(message)
        except WebSocketDisconnect:
            return
        finally:
            forward.cancel()
            self.hub.unlisten(events)
            for question_id in self.responses:  # nobody will read their answers: never computed
                self.hub.abandon(question_id)

    async def _take(self, message: dict) -> None:
        text = message.get("text")
        if text is None:
            return await self.error("binary_message", "events are JSON text messages; send a frame as "
                                                      "input_video_frame.append with a base64 'image'")
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_message:
            return await self.error("message_too_large", f"the message is {size} bytes; the limit is "
                                                         f"{self.limits.max_message}")
        wait = self.rates.wait_for(self.client)
        if wait:
            return await self.error("rate_limit_exceeded", f"more than {self.limits.rate:g} events a second "
                                    f"(bursts of {self.limits.burst}); this one was dropped, send again after "
                                    f"{wait:.2f} s", kind="rate_limit_error")
        try:
            event = json.loads(text)
        except (ValueError, RecursionError) as error:
            return await self.error("invalid_json", f"the message is not JSON: {str(error)[:120]}")
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return await self.error("invalid_event", "an event is a JSON object with a string 'type'")
        kind, event_id = event["type"], event.get("event_id")
        allowed = EVENT_FIELDS.get(kind)
        if allowed is None:
            return await self.error("unknown_event", f"unknown event type {kind[:64]!r}; the types are "
                                                     f"{sorted(EVENT_FIELDS)}", event_id)
        extra = sorted(set(event) - allowed - {"type", "event_id"})
        if extra:
            return await self.error("unknown_field", f"{kind} has no field {', '.join(map(repr, extra))[:120]}; its "
                                                     f"fields are {sorted(allowed)}", event_id)
        if kind == "input_video_frame.append":
            await self._append(event, event_id)
        elif kind == "input_video_frame.commit":
            await self.send({"type": "input_video_frame.committed", "frames_received": self.source.received,
                             "frames_waiting": self.source.waiting(), "frames_dropped": self.source.dropped,
                             "stream_time": self.source.newest_time})
        elif kind == "response.create":
            await self._ask(event.get("response"), event_id)
        else:
            await self._cancel(event.get("response_id"), event_id)

    async def _append(self, event: dict, event_id) -> None:
        try:
            image = await asyncio.to_thread(decode_frame, event.get("image"), self.limits)
            self.source.push(image, event.get("timestamp"))
        except FrameRefused as error:
            await self.error("invalid_frame", str(error), event_id)

    async def _ask(self, response, event_id) -> None:
        if isinstance(response, dict):  # asked before the first frames, a question waits for them
            response = dict({"wait": True}, **response)
        try:
            question = Question.from_dict(response, "realtime", new_id=self.hub.stream.queue.new_id)
            self.hub.submit(question, self.client)
        except BadQuestion as error:
            return await self.error("invalid_question", str(error), event_id)
        except HTTPException as error:  # the queue, or this client's share of it, is full
            kind = "rate_limit_error" if error.status_code == 429 else "invalid_request_error"
            return await self.error("queue_full" if error.status_code == 429 else "invalid_question",
                                    str(error.detail), event_id, kind)
        self.responses[question.id] = question.kind
        await self.send({"type": "response.created", "response": dict(
            id=question.id, object="realtime.response", status="in_progress", kind=question.kind,
            question=question.text)})

    async def _cancel(self, response_id, event_id) -> None:
        if not isinstance(response_id, str) or response_id not in self.responses:
            return await self.error("unknown_response", f"this session has no response {str(response_id)[:64]!r} "
                                                        f"to cancel", event_id)
        try:
            self.hub.stream.queue.cancel(response_id)
        except BadQuestion:
            return await self.error("not_cancellable", f"response {response_id!r} is no longer waiting (answered, "
                                                       f"or being answered)", event_id)
        del self.responses[response_id]
        await self.send({"type": "response.done", "response": dict(id=response_id, object="realtime.response",
                                                                     status="cancelled")})

    async def _forward(self, events: asyncio.Queue) -> None:
        """The stream's events, as this session's: its answers and errors, folds, status."""
        while True:
            kind, data = await events.get()
            if kind == "overflow":  # this session stopped reading its events: end it
                await self.websocket.close(1008, "the client did not read its events")
                return
            if kind == "status":
                await self.send({"type": "stream.status", "status": data})
            elif kind == "fold":
                await self.send(dict(type="input_video_frame.folded", **data))
            elif kind == "answer" and data["question_id"] in self.responses:
                qid = data["question_id"]
                await self.send({"type": "response.output_text.done", "response_id": qid, "text": data["answer"],
                                 "time_span": data["time_span"], "cache_tokens": data["cache_tokens"],
                                 "latency_s": data["latency_s"],
                                 **({"model_note": data["model_note"]} if "model_note" in data else {})})
                if self.responses[qid] != "standing":
                    del self.responses[qid]
                    await self.send({"type": "response.done", "response": dict(
                        id=qid, object="realtime.response", status="completed", output_text=data["answer"])})
            elif kind == "error" and data["question_id"] is None:
                await self.error("stream_error", data["error"], kind="server_error")
            elif kind == "error" and data["question_id"] in self.responses:
                qid = data["question_id"]
                self.responses.pop(qid)
                await self.error("response_failed", data["error"], response_id=qid, kind="server_error")
                await self.send({"type": "response.done", "response": dict(id=qid, object="realtime.response",
                                                                           status="failed")})


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, model: str | None = None) -> None:
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    registry: Realtime | None = websocket.app.state.realtime
    limits: HttpLimits = websocket.app.state.limits
    try:
        if registry is None:
            raise SessionRefused("this server takes no realtime sessions (the command serving it makes no streams)")
        hub = registry.begin(model)
    except SessionRefused as error:
        await websocket.send_text(json_text({"type": "error", "error": dict(
            type="invalid_request_error", code="session_refused", message=str(error))}))
        await websocket.close(1008, str(error)[:120])
        return
    try:
        await Session(websocket, hub, limits, client_of(websocket)).run()
    finally:
        registry.end(hub)
