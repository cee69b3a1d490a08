"""The OpenAI-compatible HTTP API of `transfertune serve`: /v1/models, /v1/completions, /v1/chat/completions
and /health, over the continuous-batching `Engine`, and the admin routes /v1/load_value and /v1/unload_value.

The request bodies are in `protocol.py`, what the routes do with them in `openai_serving.py` and
`value_admin.py`. Errors use OpenAI's JSON format: 400 for a bad request (a context that is too long included,
a value directory refused), 401 without the API key, 404 for a model (or value model) the server does not
serve, 408 for a request that arrives too slowly, 409 for a value model being unloaded, 429 when the waiting
queue is full, 503 past the connection limit.
"""
from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfertune.inference.composed_model import ComposedModel
from transfertune.serving.openai_serving import (
    EngineError,
    Server,
    chat_completion,
    completion,
)
from transfertune.serving.protocol import (
    JSON_BODY,
    APIError,
    ChatRequest,
    CompletionRequest,
    LoadValueRequest,
    UnloadValueRequest,
    error_type,
    validation_error,
)
from transfertune.serving.value_admin import load_value, unload_value

router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


def _respond(result):
    """A whole response as JSON, a stream as server-sent events."""
    return result if isinstance(result, dict) else StreamingResponse(result, media_type="text/event-stream")


# -- routes (no return annotations: FastAPI would read them as response models) -----------------------
@router.get("/health")
async def health(request: Request):
    server = _server(request)
    return {"status": "ok", "model": server.model_name, "values": server.registry.names(), **server.engine.load}


@router.get("/v1/models")
async def models(request: Request):
    server = _server(request)
    data = []
    for model in server.models.served():
        entry = {"id": model.id, "object": "model", "created": server.created, "owned_by": "transfertune",
                 "max_model_len": server.max_model_len, "chat_template": server.models.chat_format(model.values),
                 "value": dict(zip(model.values, model.weights)), "beta": model.beta if model.values else None}
        if model.id != server.models.base_id:
            entry["parent"] = server.models.base_id
        data.append(entry)
    return {"object": "list", "data": data}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return _respond(await completion(_server(request), body, request))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    return _respond(await chat_completion(_server(request), body, request))


@router.post("/v1/load_value")
async def load_value_route(body: LoadValueRequest, request: Request):
    return await load_value(_server(request), body)


@router.post("/v1/unload_value")
async def unload_value_route(body: UnloadValueRequest, request: Request):
    return await unload_value(_server(request), body)


# -- errors, all in OpenAI's format ----------------------------------------------------------------------
def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request: Request, err: APIError):
    return error_response(err)


async def _invalid(request: Request, err: RequestValidationError):
    return error_response(validation_error(err.errors()))


async def _http_error(request: Request, err: StarletteHTTPException):
    return error_response(APIError(err.status_code, str(err.detail), type=error_type(err.status_code),
                                   headers=getattr(err, "headers", None)))


async def _engine_error(request: Request, err: EngineError):
    return error_response(APIError(500, f"decoding failed: {err}", type="server_error"))


async def _bug(request: Request, err: Exception):  # still a 500, but in the format clients parse
    return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error"))


ERROR_HANDLERS = {APIError: _api_error, RequestValidationError: _invalid, StarletteHTTPException: _http_error,
                  EngineError: _engine_error, Exception: _bug}


OPEN_PATHS = ("/health",)  # what answers without the API key
JSON_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/load_value", "/v1/unload_value")
BOM = b"\xef\xbb\xbf"


class APIKeyMiddleware:
    """401 for every request but /health (the API, /docs, /redoc, /openapi.json, unknown paths) without
    `Authorization: Bearer KEY`, checked before the body is read."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(given, self.key):
                err = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                               type="authentication_error", code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_json(content_type: bytes) -> bool:
    kind = content_type.split(b";")[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


class JSONBodyMiddleware:
    """The bodies of the JSON routes, before FastAPI parses them: a 400 in the API's words for a body without
    `Content-Type: application/json` or one that is not UTF-8, and a leading UTF-8 byte-order mark dropped.
    The body is read whole here (FastAPI would read it whole too); later `receive` calls (a disconnect) pass
    through."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in JSON_ROUTES:
            await self.app(scope, receive, send)
            return
        if not _is_json(dict(scope["headers"]).get(b"content-type", b"")):
            await error_response(APIError(400, JSON_BODY))(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks).removeprefix(BOM)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            problem = f"the request body is not UTF-8 text (byte {err.start}); it must be a JSON object"
            await error_response(APIError(400, problem))(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# -- the app ----------------------------------------------------------------------------------------------
def create_app(composed: ComposedModel, *, model_name: str = "transfertune", value_names=None,
               beta: float | None = None, vocab_map=None, api_key: str | None = None, max_batch: int = 32,
               max_queue: int = 256, max_model_len: int | None = None, hand_over: bool = False,
               draft=None) -> FastAPI:
    """The FastAPI app. Its lifespan starts and stops the engine thread (TestClient and uvicorn both run it).
    `composed`'s value models are served by name (`value_names`, default their directories' names); `beta` and
    `vocab_map` apply to every value model, those loaded later included (see `Server`). With `hand_over` the
    caller gives `composed` up: its value models are taken out of it, so that unloading one frees its memory.
    `draft` (an `engine.Draft`): decode the default model's requests speculatively with it (--draft)."""
    server = Server(composed, model_name=model_name, value_names=value_names, beta=beta, vocab_map=vocab_map,
                    max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len, draft=draft)
    if hand_over:
        composed.values, composed.value_models, composed.weights = [], [], []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="transfertune", version="1", lifespan=lifespan, exception_handlers=ERROR_HANDLERS,
                  description="OpenAI-compatible completions from a base model composed with value models.")
    app.state.server = server
    app.add_middleware(JSONBodyMiddleware)
    if api_key:  # added last: the outermost, so the key is checked before anything reads the body
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.include_router(router)
    return app


# -- the connections ---------------------------------------------------------------------------------------
TIMEOUT_KEEP_ALIVE = 5.0  # seconds an idle kept-alive connection stays open (uvicorn's default)
TIMEOUT_HEADER = 10.0  # seconds from a connection's opening, or a new request's first byte, to its last header
TIMEOUT_BODY = 30.0  # seconds from the last header to the body's last byte
MAX_CONNECTIONS = 512  # open connections at most; more are answered 503 and closed


def _raw_response(status: int, reason: str, err: APIError) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers given outside a request cycle."""
    import json

    body = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def limited_protocol(timeout_header: float = TIMEOUT_HEADER, timeout_body: float = TIMEOUT_BODY,
                     max_connections: int = MAX_CONNECTIONS):
    """uvicorn's h11 protocol with read deadlines and a cap on open connections (uvicorn has neither: a client
    that sends a header a byte at a time, or opens connections and sends nothing, would hold them for ever).

    A connection gets `timeout_header` seconds from its opening to the end of its request's headers (a
    kept-alive one: from the first byte of its next request; between requests uvicorn's keep-alive timeout
    applies), then `timeout_body` seconds for the body; past either it gets a 408 (headers) or is closed (body:
    the request is under way). Past `max_connections` open connections a new one gets a 503 and is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._phase, self._timer = None, None
            if len(self.connections) > max_connections:
                err = APIError(503, f"the server holds its limit of {max_connections} open connections; retry later",
                               type="server_error", code="too_many_connections")
                self.transport.write(_raw_response(503, "Service Unavailable", err))
                self.transport.close()
                return
            self._arm("header")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            state = self.conn.their_state
            if state is h11.IDLE:
                self._arm("header")
            elif state is h11.SEND_BODY:
                self._arm("body")
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, phase: str) -> None:
            if self._phase == phase:
                return
            self._disarm()
            self._phase = phase
            seconds = timeout_header if phase == "header" else timeout_body
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if getattr(self, "_timer", None) is not None:
                self._timer.cancel()
            self._phase, self._timer = None, None

        def _expired(self) -> None:
            phase, self._phase, self._timer = self._phase, None, None
            if self.transport.is_closing():
                return
            if phase == "header" and self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
                err = APIError(408, f"the request's headers did not arrive within {timeout_header:g} s",
                               code="request_timeout")
                self.transport.write(_raw_response(408, "Request Timeout", err))
            self.transport.close()

    return LimitedH11Protocol


def serve(composed: ComposedModel, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          timeout_keep_alive: float = TIMEOUT_KEEP_ALIVE, timeout_header: float = TIMEOUT_HEADER,
          timeout_body: float = TIMEOUT_BODY, max_connections: int = MAX_CONNECTIONS, **app_kwargs) -> None:
    """Serve until interrupted (uvicorn, with `limited_protocol`'s read deadlines and connection cap)."""
    import uvicorn

    config = uvicorn.Config(create_app(composed, **app_kwargs), host=host, port=port, log_level=log_level,
                            timeout_keep_alive=timeout_keep_alive,
                            http=limited_protocol(timeout_header, timeout_body, max_connections))
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down gracefully, then re-raised the signal (as uvicorn.run)
        pass
