"""`POST /v1/chat/completions` in OpenAI's schema: `model` names a stream, the last user message is the
question, answered over that stream's current cache (as a one-off question on its queue); `GET /v1/models`
lists the streams as models.

A user message may carry a video instead, as vLLM and SGLang take it: a `{"type": "video_url", "video_url":
{"url": ...}}` content part. Then no stream is asked: the video is folded by the one video job with the
question guiding its pruning (video.py: where a video may come from, and the limits), and `model` is only
echoed back. Its `usage` counts what the model read: `prompt_tokens` the video's tokens (every sampled frame,
before pruning) plus the question's, `completion_tokens` the answer's; `video` says how many frames and
seconds, and how many tokens per layer the answer was computed over after pruning.

The model answers in one piece, so a streamed response is one content chunk between the role
chunk and the finishing one; OpenAI clients read it like any other stream. A client that goes
away before its answer has its question withdrawn from the queue, so it is never computed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict
from sse_starlette.sse import EventSourceResponse

from sinks import json_text

from ..questions import BadQuestion, Question
from .guard import client_of

router = APIRouter()


class VideoUrl(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    video_url: VideoUrl | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: accepted and unused
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, ...: the stream's settings decide
    model: str
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


def question_of(request: ChatRequest) -> tuple[str, str | None]:
    """The question (the last user message's text) and the URL of the video it is about, if it sends one."""
    if request.n != 1:
        raise HTTPException(400, f"n must be 1 (one answer per question), got {request.n}")
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise HTTPException(400, "messages holds no user message; the last user message is the question")
    content, videos = users[-1].content, []
    if isinstance(content, list):
        kinds = sorted({part.type for part in content if part.type not in ("text", "video_url")})
        if kinds:
            raise HTTPException(400, f"only text content and video_url parts are accepted, got {kinds}")
        videos = [part for part in content if part.type == "video_url"]
        if len(videos) > 1:
            raise HTTPException(400, f"one video_url part per question, got {len(videos)}")
        if videos and videos[0].video_url is None:
            raise HTTPException(400, 'a video_url part needs "video_url": {"url": ...}')
        content = " ".join(part.text or "" for part in content if part.type == "text")
    if not content or not content.strip():
        raise HTTPException(400, "the last user message holds a video_url but no text part: the question" if videos
                            else "the last user message is empty")
    return content.strip(), videos[0].video_url.url if videos else None


STARTED = int(time.time())  # "created" of every model: the streams exist since the server started


def model_entry(stream_id: str) -> dict:
    return dict(id=stream_id, object="model", created=STARTED, owned_by="emloc-stream")


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The streams, as OpenAI's model list: each stream is a `model` of /v1/chat/completions."""
    return dict(object="list", data=[model_entry(model) for model in _models(request)])


@router.get("/v1/models/{model}")
async def one_model(model: str, request: Request) -> dict:
    if model not in _models(request):
        raise HTTPException(404, f"model {model[:64]!r} is not a stream here; the streams are "
                                 f"{sorted(request.app.state.hubs)}")
    return model_entry(model)


def _models(request: Request) -> list[str]:
    """The streams, then the model itself when it answers video_url parts (any name does; clients pick one from
    this list)."""
    videos, hubs = request.app.state.videos, request.app.state.hubs
    return list(hubs) + ([videos.name] if videos is not None and videos.name not in hubs else [])


class ClientGone(Exception):
    """The client closed its connection before the answer came."""


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    text, video = question_of(body)
    question_id = f"chat-{uuid.uuid4().hex[:12]}"
    try:
        question = Question.from_dict({"id": question_id, "question": text}, "http")
    except BadQuestion as error:
        raise HTTPException(422, str(error)) from error
    if video is not None:
        return await _about_video(body, request, question, video)
    hub = request.app.state.hubs.get(body.model)
    if hub is None:
        raise HTTPException(404, f"model {body.model[:64]!r} is not a stream here; the streams are "
                                 f"{sorted(request.app.state.hubs)}" + ("" if request.app.state.videos is None else
                                 "; with a video_url part, any model answers about that video"))
    answer = hub.expect(question_id)
    try:
        hub.submit(question, client_of(request))
    except HTTPException:
        hub.forget(question_id)
        raise
    created = int(time.time())
    base = dict(id=question_id, created=created, model=body.model)

    async def outcome() -> dict:
        """The answer; ClientGone (question withdrawn) if the client leaves first, 504 after the timeout."""
        gone = asyncio.ensure_future(client_gone(request))
        try:
            done, _ = await asyncio.wait({answer, gone}, timeout=request.app.state.answer_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the streamed response was cancelled: its client left
            hub.abandon(question_id)
            raise
        finally:
            gone.cancel()
        if answer in done:
            data, error = answer.result()
            if error is not None:
                raise HTTPException(422, f"the question could not be answered: {error}")
            return data
        if gone in done:
            hub.abandon(question_id)
            raise ClientGone()
        hub.forget(question_id)
        raise HTTPException(504, f"stream {body.model!r} gave no answer within "
                                 f"{request.app.state.answer_timeout:.0f} s (is it serving?)")

    if not body.stream:
        try:
            data = await outcome()
        except ClientGone:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        return dict(base, object="chat.completion",
                    choices=[dict(index=0, message=dict(role="assistant", content=data["answer"]),
                                  finish_reason="stop")],
                    usage=dict(prompt_tokens=data["cache_tokens"], completion_tokens=len(data["answer"].split()),
                               total_tokens=data["cache_tokens"] + len(data["answer"].split())),
                    stream_time=data["time_span"],
                    **({"model_note": data["model_note"]} if "model_note" in data else {}))

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"data": json_text(dict(base, object="chat.completion.chunk",
                                        choices=[dict(index=0, delta=delta, finish_reason=finish)]))}

    async def chunks():
        yield chunk({"role": "assistant", "content": ""})
        try:
            data = await outcome()
        except HTTPException as error:  # the stream has begun: the error goes in the stream, as OpenAI does
            yield {"data": json_text({"error": {"message": error.detail, "code": error.status_code}})}
            return
        except ClientGone:
            return
        yield chunk({"content": data["answer"]})
        yield chunk({}, "stop")
        yield {"data": "[DONE]"}
    return EventSourceResponse(chunks(), ping=15)


async def _about_video(body: ChatRequest, request: Request, question: Question, url: str):
    """A question about the video the request sends or names (video.py), answered by the one video job."""
    from .video import Stopped, VideoRefused

    videos = request.app.state.videos
    if videos is None:
        raise HTTPException(400, "this server answers no video_url (it has no model of its own to fold one)")
    try:
        videos.check(url)  # refused before anything is read: a status, streamed or not
    except VideoRefused as error:
        raise HTTPException(error.status, str(error)) from None
    stop = threading.Event()
    base = dict(id=question.id, created=int(time.time()), model=body.model)

    async def outcome():
        """The answer; ClientGone (the job stopped) if the client leaves first; HTTPException if refused."""
        job = asyncio.ensure_future(videos.answer(url, question.text, stop))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            done, _ = await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the streamed response was cancelled: its client left
            stop.set()
            job.cancel()
            raise
        finally:
            gone.cancel()
        if job not in done:
            stop.set()
            job.cancel()
            raise ClientGone()
        try:
            return job.result()
        except VideoRefused as error:
            raise HTTPException(error.status, str(error)) from None
        except Stopped:
            raise ClientGone() from None

    def usage(answer) -> dict:
        prompt = answer.video_tokens + answer.question_tokens
        return dict(prompt_tokens=prompt, completion_tokens=answer.answer_tokens,
                    total_tokens=prompt + answer.answer_tokens)

    def video_info(answer) -> dict:
        return dict(frames=answer.frames, time_span=answer.time_span, tokens_kept=round(answer.video_tokens_kept))

    if not body.stream:
        try:
            answer = await outcome()
        except ClientGone:
            return Response(status_code=499)
        return dict(base, object="chat.completion",
                    choices=[dict(index=0, message=dict(role="assistant", content=answer.text),
                                  finish_reason="stop")],
                    usage=usage(answer), video=video_info(answer))
    # Refusals that need no decoding come as a status before the stream begins; the rest in the stream.
    job = asyncio.ensure_future(outcome())
    try:
        await asyncio.wait({job}, timeout=0.5)
    except asyncio.CancelledError:
        job.cancel()
        raise
    if job.done() and job.exception() is not None and isinstance(job.exception(), HTTPException):
        raise job.exception()

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return {"data": json_text(dict(base, object="chat.completion.chunk",
                                        choices=[dict(index=0, delta=delta, finish_reason=finish)], **extra))}

    async def chunks():
        yield chunk({"role": "assistant", "content": ""})
        try:
            answer = await job
        except HTTPException as error:  # the stream has begun: the error goes in the stream, as OpenAI does
            yield {"data": json_text({"error": {"message": error.detail, "code": error.status_code}})}
            return
        except ClientGone:
            return
        yield chunk({"content": answer.text})
        yield chunk({}, "stop", video=video_info(answer))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {"data": json_text(dict(base, object="chat.completion.chunk", choices=[], usage=usage(answer)))}
        yield {"data": "[DONE]"}
    return EventSourceResponse(chunks(), ping=15)
