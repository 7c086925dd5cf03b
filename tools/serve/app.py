"""The HTTP side: FastAPI routes, OpenAI-shaped errors, server-sent events, and uvicorn with a
graceful SIGTERM.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` for SSE
chunks ending ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Handlers
validate, admit the request into the engine (429 when full) and wait for its events; a client
that goes away, while waiting or mid-stream, cancels its job. SIGTERM drains the engine (every
running generation stops at its next token and commits), lets uvicorn finish the responses, then
closes the engine and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierstore.errors import InvalidSessionNameError
from tierstore.layout import check_session_name

from .engine import Engine, Job
from .protocol import ApiError, ChatRequest, CompletionRequest, Reply, Sampling

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Tierstore-Session"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
CLIENT_GONE = 499  # nginx's code for "client closed request": counted, never seen by a client


class _ClientGone(Exception):
    pass


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _next(job: Job, request: Request, poll_s: float = 0.25):
    """The job's next event; cancels the job (``_ClientGone``) if the client leaves meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), poll_s)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise _ClientGone() from None


class _EventStream(StreamingResponse):
    """Server-sent events of one job. However the response ends (done, client gone, server
    stopping), the job is cancelled: a client gone mid-stream frees its worker at the next token."""

    def __init__(self, job: Job, reply: Reply, include_usage: bool) -> None:
        self.job, self.reply, self.include_usage = job, reply, include_usage
        super().__init__(self._events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()

    async def _events(self):
        if self.reply.chat:
            yield _sse(self.reply.chunk(first=True))
        while True:
            kind, value = await self.job.events.get()
            if kind == "text":
                yield _sse(self.reply.chunk(value))
            elif kind == "end":
                yield _sse(self.reply.chunk(finish_reason=value.finish_reason))
                if self.include_usage:
                    yield _sse(self.reply.usage_chunk(value.usage))
                break
            elif kind == "error":
                yield _sse(value.body())
                break
        yield b"data: [DONE]\n\n"


class _CountRequests:
    """ASGI middleware: ``tierstore_requests_total{endpoint, code}`` for every HTTP request, by
    the status it was answered with (499: the client left before any answer)."""

    def __init__(self, app, engine: Engine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [CLIENT_GONE]

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.engine.metrics.requests.labels(path, str(status[0])).inc()


def _validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0] if exc.errors() else {}
    if err.get("type") == "json_invalid" or tuple(err.get("loc", ())) == ("body",):
        why = err.get("ctx", {}).get("error") or err.get("msg", "not a JSON object")
        return ApiError(400, f"We could not parse the JSON body of your request: {why}", code="invalid_json")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param=param, code="invalid_value")


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application over a started ``engine`` (closed when the app shuts down)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title="tierstore serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error").response()

    @app.get("/health")
    def health():
        if engine.draining.is_set():
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": engine.cfg.served_name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": engine.cfg.served_name, "object": "model", "created": 0,
                                            "owned_by": "tierstore"}]}

    @app.get("/metrics")
    def metrics():  # a plain def: starlette runs it off the event loop (store.stats() reads LMDB)
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await _complete(engine, request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(engine, request, body, chat=False)

    return _CountRequests(app, engine)


def _session(request: Request, body) -> str | None:
    """The optional session name: the ``X-Tierstore-Session`` header, else the ``user`` field."""
    name, param = request.headers.get(SESSION_HEADER), SESSION_HEADER
    if name is None:
        name, param = body.user, "user"
    if name is None:
        return None
    try:
        return check_session_name(name)
    except InvalidSessionNameError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None


async def _complete(engine: Engine, request: Request, body, chat: bool):
    body.refuse_unsupported()
    if body.model != engine.cfg.served_name:
        raise ApiError(404, f"The model {body.model!r} does not exist; this server serves "
                       f"{engine.cfg.served_name!r}", param="model", code="model_not_found")
    if body.limit is not None and body.limit > engine.cfg.max_tokens:
        param = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param}: {body.limit} is more than this server's limit of {engine.cfg.max_tokens}",
                       param=param, code="max_tokens_exceeded")
    prompt = body.plain_messages() if chat else body.single_prompt()
    job = Job(chat, prompt, Sampling.of(body), _session(request, body), asyncio.get_running_loop())
    engine.submit(job)
    reply = Reply(chat, engine.cfg.served_name)
    try:
        kind, value = await _next(job, request)
        if kind == "error":
            raise value
        if body.stream:
            return _EventStream(job, reply, body.include_usage)
        parts = []
        while True:
            kind, value = await _next(job, request)
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                raise value
            elif kind == "end":
                return reply.full("".join(parts), value.finish_reason, value.usage)
    except _ClientGone:
        return Response(status_code=CLIENT_GONE)


class _Server(uvicorn.Server):
    """uvicorn, where SIGTERM/SIGINT first drain the engine, and a graceful stop exits 0 (uvicorn
    would re-raise the signal once done, which ends the process by that signal)."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (``port=0``: any free port; read it from ``getsockname()``)."""
    return socket.create_server((host, port), backlog=128)


def serve(engine: Engine, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve on ``sock`` until SIGTERM/SIGINT; the engine is closed on the way out."""
    config = uvicorn.Config(create_app(engine), log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=30)
    try:
        _Server(config, engine).run(sockets=[sock])
    finally:
        engine.close()
