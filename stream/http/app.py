"""The REST API, server-sent events, the page and /metrics, as one FastAPI app over the streams' hubs.

Every request first passes the `Guard` (guard.py): Host allow-list, per-client rate, bearer token
(every endpoint but `/` and `/health` wants `Authorization: Bearer <token>` when a token is set),
body size and time limits. Bad requests get a 4xx whose `detail` names the problem; every 429 says
when to retry (`Retry-After`). Stream and question ids from the client are only ever looked up in
dictionaries, never used as paths.
"""

from __future__ import annotations

import asyncio
import io
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sinks import json_text, rounded

from ..payload import read_json
from ..questions import BadQuestion, Question
from .guard import Guard, HttpLimits, client_of, error_response
from .hub import StreamHub
from .metrics import Metrics
from .realtime import Realtime
from .realtime import router as realtime_router

PAGE = Path(__file__).with_name("page.html")
SAMPLE_EVERY = 1.0  # seconds between status samples (the page's chart, SSE status events)


class Ask(BaseModel):
    """The question schema (`Question.from_dict`), for the API's documentation: the body is read by
    the same parser and constructor as an MQTT payload, so their fields and error messages agree."""
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str = Field(description="the question, in the model's language")
    id: str | None = Field(None, description="the question's id (default: the stream's next one)")
    at: float | None = Field(None, description="stream time (s) to answer at: a scheduled question")
    every: int | None = Field(None, description="re-answer every K folded chunks: a standing question")
    wait: bool = Field(False, description="asked before the stream has video: wait for its first frames")


ASK_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": Ask.model_json_schema()}}}}


class RoundedJSONResponse(JSONResponse):
    """Every JSON response, its times rounded to the millisecond as every other output's (sinks/json_text.py)."""

    def render(self, content) -> bytes:
        return super().render(rounded(content))


def create_app(streams: list, token: str | None = None, answer_timeout: float = 120.0,
               limits: HttpLimits | None = None, bound: str = "127.0.0.1", open_stream=None, videos=None) -> FastAPI:
    """The app behind its Guard; `bound` is the address served on (its name is an allowed Host).
    open_stream(id): a new stream fed by a realtime session (realtime.py), joining `streams`; None: no
    realtime sessions. videos: the VideoAnswerer (video.py) of chat requests with a video_url; None: none."""
    limits = limits or HttpLimits()
    metrics = Metrics()
    hubs = {stream.spec.id: StreamHub(stream, metrics, client_share=limits.client_share) for stream in streams}
    metrics.hubs = list(hubs.values())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        for hub in hubs.values():
            hub.attach(loop)
        sampler = asyncio.create_task(_sample(hubs))
        yield
        sampler.cancel()

    app = FastAPI(title="emloc-stream", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=RoundedJSONResponse,
                  description="Ask live video streams questions; answers over REST, server-sent events, "
                              "or the OpenAI chat-completions schema.")
    app.state.hubs, app.state.metrics, app.state.answer_timeout = hubs, metrics, answer_timeout
    app.state.limits, app.state.videos = limits, videos
    app.state.realtime = None if open_stream is None else Realtime(open_stream, streams, hubs, metrics, limits)
    _install_docs(app)

    def hub_of(stream_id: str) -> StreamHub:
        hub = hubs.get(stream_id)
        if hub is None:
            raise HTTPException(404, f"no stream {stream_id[:64]!r}; the streams are {sorted(hubs)}")
        return hub

    _install_error_handlers(app)
    app.add_middleware(Guard, limits=limits, token=token, bound=bound)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True, "streams": len(hubs)}

    @app.get("/streams")
    async def list_streams() -> list[dict]:
        return [hub.status() for hub in hubs.values()]

    @app.get("/streams/{stream_id}")
    async def one_stream(stream_id: str) -> dict:
        hub = hub_of(stream_id)
        return dict(hub.status(), history=list(hub.history))

    @app.post("/streams/{stream_id}/questions", status_code=201, openapi_extra=ASK_BODY)
    async def ask(stream_id: str, request: Request) -> dict:
        hub = hub_of(stream_id)
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):  # a form a foreign page may post
            raise HTTPException(415, f"the body must be JSON (Content-Type: application/json), got {kind[:64]!r}")
        try:
            question = Question.from_dict(read_json(await request.body(), limits.max_body), "http",
                                          new_id=hub.stream.queue.new_id)
        except BadQuestion as error:
            raise HTTPException(422, str(error)) from error
        hub.submit(question, client_of(request))
        kind = "standing" if question.every else "scheduled" if question.at is not None else "one-off"
        return {"id": question.id, "stream_id": stream_id, "kind": kind}

    @app.delete("/streams/{stream_id}/questions/{question_id}")
    async def withdraw(stream_id: str, question_id: str) -> dict:
        hub = hub_of(stream_id)
        try:
            hub.stream.queue.cancel(question_id)
        except BadQuestion:
            raise HTTPException(404, f"stream {stream_id!r} has no waiting or standing question "
                                     f"{question_id[:64]!r}") from None
        return {"id": question_id, "withdrawn": True}

    @app.get("/streams/{stream_id}/answers")
    async def answers(stream_id: str, since: int = Query(0, ge=0, description="the last seq already seen"),
                      limit: int = Query(100, ge=1, le=1000)) -> dict:
        hub = hub_of(stream_id)
        page = hub.answers_since(since, limit)
        return {"answers": page, "next": page[-1]["seq"] if page else since, "newest": hub.newest_seq()}

    @app.get("/streams/{stream_id}/events")
    async def events(stream_id: str, request: Request):
        hub = hub_of(stream_id)
        queue = hub.listen()

        async def stream():
            try:
                yield {"event": "status", "data": json_text(hub.status())}
                while True:
                    kind, data = await queue.get()
                    if kind == "overflow" or await request.is_disconnected():
                        return
                    yield {"event": kind, "data": json_text(data)}
            finally:
                hub.unlisten(queue)
        return EventSourceResponse(stream(), ping=15)

    @app.get("/streams/{stream_id}/frame.jpg")
    async def frame(stream_id: str) -> Response:
        hub = hub_of(stream_id)
        newest = hub.stream.newest_frame
        if newest is None:
            raise HTTPException(404, f"stream {stream_id!r} has no frame yet")
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(newest.image).save(out, format="JPEG", quality=85)
        return Response(out.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-store",
                                                                          "X-Stream-Time": f"{newest.time:.2f}"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from .openai import router

    app.include_router(router)
    app.include_router(realtime_router)
    return app


def _install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from assets installed with the http extra (fastapi-offline's copies), not
    from a CDN: the docs work on a machine without internet, and the page loads nothing from elsewhere."""
    import fastapi_offline
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    assets = Path(fastapi_offline.__file__).with_name("static")
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="emloc-stream API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="emloc-stream API",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)


async def _sample(hubs: dict) -> None:
    while True:
        for hub in hubs.values():
            try:
                hub.sample()
            except Exception:  # a status read racing a fold: the next sample will do
                pass
        await asyncio.sleep(SAMPLE_EVERY)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
            cause = (item.get("ctx") or {}).get("error")
            because = f" ({cause})" if isinstance(cause, str) else ""
            problems.append(f"{where}: {item.get('msg', 'invalid')}{because}")
        return error_response(422, "; ".join(problems) or "invalid request")
