"""`POST /v1/chat/completions` in OpenAI's schema: `model` names a stream, the last user message is the
question, answered over that stream's current cache (as a one-off question on its queue); `GET /v1/models`
lists the streams as models.

The model answers in one piece, so a streamed response is one content chunk between the role
chunk and the finishing one; OpenAI clients read it like any other stream. A client that goes
away before its answer has its question withdrawn from the queue, so it is never computed.
"""

from __future__ import annotations

import asyncio
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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: accepted and unused
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, ...: the stream's settings decide
    model: str
    messages: list[Message]
    stream: bool = False
    n: int = 1


def question_of(request: ChatRequest) -> str:
    if request.n != 1:
        raise HTTPException(400, f"n must be 1 (one answer per question), got {request.n}")
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise HTTPException(400, "messages holds no user message; the last user message is the question")
    content = users[-1].content
    if isinstance(content, list):
        kinds = sorted({part.type for part in content if part.type != "text"})
        if kinds:
            raise HTTPException(400, f"only text content is accepted (the video is the stream), got {kinds}")
        content = " ".join(part.text or "" for part in content)
    if not content or not content.strip():
        raise HTTPException(400, "the last user message is empty")
    return content.strip()


STARTED = int(time.time())  # "created" of every model: the streams exist since the server started


def model_entry(stream_id: str) -> dict:
    return dict(id=stream_id, object="model", created=STARTED, owned_by="emloc-stream")


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The streams, as OpenAI's model list: each stream is a `model` of /v1/chat/completions."""
    return dict(object="list", data=[model_entry(stream_id) for stream_id in request.app.state.hubs])


@router.get("/v1/models/{model}")
async def one_model(model: str, request: Request) -> dict:
    if model not in request.app.state.hubs:
        raise HTTPException(404, f"model {model[:64]!r} is not a stream here; the streams are "
                                 f"{sorted(request.app.state.hubs)}")
    return model_entry(model)


class ClientGone(Exception):
    """The client closed its connection before the answer came."""


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    hub = request.app.state.hubs.get(body.model)
    if hub is None:
        raise HTTPException(404, f"model {body.model[:64]!r} is not a stream here; the streams are "
                                 f"{sorted(request.app.state.hubs)}")
    question_id = f"chat-{uuid.uuid4().hex[:12]}"
    try:
        question = Question.from_dict({"id": question_id, "question": question_of(body)}, "http")
    except BadQuestion as error:
        raise HTTPException(422, str(error)) from error
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
                    stream_time=data["time_span"])

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
