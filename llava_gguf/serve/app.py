"""The HTTP side of `llava-gguf serve`: FastAPI routes over the scheduler. Requests are parsed (and their images
read) in a worker thread, queued on the scheduler, and answered as OpenAI's objects — whole, or streamed as
server-sent events. Every failure leaves as OpenAI's error shape with a 4xx (a 500 only for a bug, without a
traceback); the API key, when set, is checked in constant time on every /v1 route and /metrics.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations (`request: Request`), and
Request is imported inside build_app, where only an evaluated annotation can see it."""

import asyncio
import hmac
import json
import sys
import time
from dataclasses import dataclass, field
from importlib import resources

from llava_gguf.serve.errors import ApiError, check_model, overloaded, unauthorized
from llava_gguf.serve.guard import Guard
from llava_gguf.serve.protocol import ChatRequest, ImagePolicy, parse_chat_request
from llava_gguf.serve.responses import Completion, failure, metrics_text, sse
from llava_gguf.runtime.scheduler import Done, Failed, Job, QueueFull, Scheduler, Text

PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServerState:
    """What the routes share: the scheduler once the model is loaded (None while loading), the settings."""

    alias: str
    names: set[str]  # what a request's `model` may say: the alias, the LLM file's name and stem
    policy: ImagePolicy
    api_key: str | None = None
    system: str | None = None
    max_body: int = 64 << 20
    parallel: int = 1
    n_ctx: int = 0
    loopback_only: bool = True  # bound to loopback: requests must name a loopback Host (see guard.py)
    scheduler: Scheduler | None = None
    error: str | None = None  # the model failed to load
    started: float = field(default_factory=time.time)


def page_html() -> bytes:
    return resources.files("llava_gguf.serve").joinpath("static/index.html").read_bytes()


def authorized(state: ServerState, header: str | None) -> bool:
    if state.api_key is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), state.api_key.encode())


async def read_body(request, limit: int) -> object:
    """The request's JSON body, at most `limit` bytes (413 past it, without reading the rest)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; the server takes at most {limit}",
                       code="request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"the request body is not JSON ({type(e).__name__}: {str(e)[:120]})",
                       code="invalid_json") from None


def build_app(state: ServerState, *, cors_origins: list[str] = ()):
    # fastapi/starlette only when serving: every other command starts without them
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool  # (fastapi: as above)
    from fastapi.exceptions import RequestValidationError  # (fastapi: as above)
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse  # (as above)
    from starlette.exceptions import HTTPException  # (starlette: as above)

    app = FastAPI(title="llava-gguf", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, loopback_only=state.loopback_only, cors_origins=cors_origins)
    if cors_origins:  # outside the guard: it answers the preflight of an allowed origin
        from fastapi.middleware.cors import CORSMiddleware  # only when asked for: no CORS by default

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error_response(ApiError(400, f"invalid request: {str(e)[:200]}", code="invalid_request"))

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        print(f"llava-gguf serve: internal error on {request.url.path}: {type(e).__name__}: {str(e)[:300]}",
              file=sys.stderr)
        return error_response(ApiError(500, "internal server error", type="server_error", code="internal_error"))

    def check_key(request) -> None:
        if not authorized(state, request.headers.get("authorization")):
            raise unauthorized()

    def ready() -> Scheduler:
        if state.scheduler is None:
            raise ApiError(503, state.error or "the model is loading",
                           code="model_loading" if state.error is None else "model_failed",
                           headers={"Retry-After": "2"})
        return state.scheduler

    @app.get("/", include_in_schema=False)
    async def page():
        return Response(page_html(), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    @app.get("/health")
    async def health():
        status = "ok" if state.scheduler is not None else "error" if state.error else "loading"
        body = {"status": status, "model": state.alias, "api_key_required": state.api_key is not None,
                "parallel": state.parallel, "n_ctx": state.n_ctx}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": state.alias, "object": "model", "created": int(state.started),
                                            "owned_by": "llava-gguf"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        check_model(name, state.names)
        return {"id": state.alias, "object": "model", "created": int(state.started), "owned_by": "llava-gguf"}

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request)
        sched = ready()
        st = sched.engine.stats
        text = metrics_text(sched.counters, sched.snapshot(), images_encoded=st.images_encoded, decoded=st.decoded,
                            copied=st.copied, reused=st.reused, decode_calls=st.decode_calls, n_ctx=state.n_ctx)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    parsing = asyncio.Semaphore(state.parallel + 2)  # bodies held and parsed at once (memory)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        sched = ready()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a form or text/plain POST is what a foreign web page can send unasked
            raise ApiError(415, f"the request body must be JSON sent as Content-Type: application/json, not "
                           f"{kind[:60] or 'none'!r}", code="unsupported_media_type")
        if not sched.has_room():  # before the body is read: a refused upload costs nothing
            sched.counters.requests_rejected += 1
            raise overloaded(1)
        async with parsing:
            body = await read_body(request, state.max_body)
            # an unknown model is a 404 before any image is read
            req: ChatRequest = await run_in_threadpool(parse_chat_request, body, policy=state.policy,
                                                       system=state.system, model_alias=state.alias,
                                                       served=state.names)
            del body
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(req.messages, req.images, req.sampling, emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                  grammar=req.grammar)
        try:
            sched.submit(job)
        except QueueFull:
            raise overloaded(1) from None
        watcher = asyncio.create_task(watch_disconnect(request, job, events))
        try:
            first = await events.get()
            if first is None:  # the client left while the request waited
                return Response(status_code=499)
            if isinstance(first, Failed):
                raise failure(first)
            completion = Completion(state.alias if req.model is None else req.model)
            if req.stream:  # the watcher goes on: a client gone during a long prefill is noticed at once
                return StreamingResponse(stream(completion, events, job, req.include_usage, watcher),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            pieces: list[str] = []
            while True:
                ev = await events.get()
                if ev is None:
                    return Response(status_code=499)
                if isinstance(ev, Text):
                    pieces.append(ev.text)
                elif isinstance(ev, Failed):
                    raise failure(ev)
                elif isinstance(ev, Done):
                    return completion.whole("".join(pieces), ev)
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise
        finally:
            if not req.stream:
                watcher.cancel()

    return app


async def watch_disconnect(request, job: Job, events: asyncio.Queue) -> None:
    """Until cancelled: when the client disconnects, its job is cancelled (its sequence freed) and the route
    waiting on `events` gets None. The body is read already, so the next ASGI message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            events.put_nowait(None)
            return


async def stream(completion: Completion, events: asyncio.Queue, job: Job, include_usage: bool,
                 watcher: asyncio.Task):
    """The answer as chat.completion.chunk events, then [DONE]. A client that disconnects ends it (the watcher
    puts None; or a write fails): the job is cancelled then, which frees its sequence."""
    finished = False
    try:
        yield sse(completion.chunk({"role": "assistant", "content": ""}, include_usage=include_usage))
        while True:
            ev = await events.get()
            if isinstance(ev, Text):
                yield sse(completion.chunk({"content": ev.text}, include_usage=include_usage))
            elif isinstance(ev, Done):
                finished = True
                yield sse(completion.chunk({}, ev.finish_reason, include_usage=include_usage))
                if include_usage:
                    yield sse(completion.usage_chunk(ev))
                yield sse("[DONE]")
                return
            elif isinstance(ev, Failed):  # headers are sent: the error goes in the stream, as OpenAI does
                finished = True
                yield sse(failure(ev).body())
                yield sse("[DONE]")
                return
            elif ev is None:  # the client is gone
                return
    finally:
        watcher.cancel()
        if not finished:
            job.cancel()

