"""The OpenAI-compatible HTTP API of `transfertune serve`: /v1/models, /v1/completions, /v1/chat/completions
and /health, over the continuous-batching `Engine`.

The request bodies are in `protocol.py`, what the routes do with them in `openai_serving.py`. Errors use
OpenAI's JSON format: 400 for a bad request (a context that is too long included), 401 without the API key, 404
for another model name, 429 when the waiting queue is full.
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
    APIError,
    ChatRequest,
    CompletionRequest,
    error_type,
    validation_error,
)

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
    return {"status": "ok", "model": server.model_name, **server.engine.load}


@router.get("/v1/models")
async def models(request: Request):
    server = _server(request)
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                        "owned_by": "transfertune", "max_model_len": server.max_model_len}]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return _respond(await completion(_server(request), body, request))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    return _respond(await chat_completion(_server(request), body, request))


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


class APIKeyMiddleware:
    """401 for /v1/* requests without `Authorization: Bearer KEY` (checked before the body is read)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(given, self.key):
                err = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                               type="authentication_error", code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- the app ----------------------------------------------------------------------------------------------
def create_app(composed: ComposedModel, *, model_name: str = "transfertune", api_key: str | None = None,
               max_batch: int = 32, max_queue: int = 256, max_model_len: int | None = None) -> FastAPI:
    """The FastAPI app. Its lifespan starts and stops the engine thread (TestClient and uvicorn both run it)."""
    server = Server(composed, model_name=model_name, max_batch=max_batch, max_queue=max_queue,
                    max_model_len=max_model_len)

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
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.include_router(router)
    return app


def serve(composed: ComposedModel, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **app_kwargs) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(composed, **app_kwargs), host=host, port=port, log_level=log_level)
