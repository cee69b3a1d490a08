"""The OpenAI-compatible HTTP API of `transfertune serve`: /v1/models, /v1/completions, /v1/chat/completions
and /health, over the continuous-batching `Engine`.

Beyond OpenAI's fields a request may carry `beta` (steering strength) and `weights` (one per value model);
requests with different ones decode in the same batch. `top_k` is accepted too. Log-probs are those of the
*composed* distribution (before temperature / top-p). Errors use OpenAI's JSON format: 400 for a bad request
(a context that is too long included), 401 without the API key, 404 for another model name, 429 when the
waiting queue is full.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfertune.inference.composed_model import ComposedModel
from transfertune.io.data import PLAIN_CHAT, encode_prompt, render_chat_prompt
from transfertune.inference.sampling import SamplingParams
from transfertune.serving.engine import Engine, Event, Overloaded, Row, Sink, prompt_logprobs

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
MAX_STOP = 16
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (logits / tiny temperature would overflow)
BETA_RANGE = (1e-3, 1e3)  # with |weight| <= MAX_WEIGHT, w / beta keeps composed logits far from float32 overflow
MAX_WEIGHT = 100.0
MAX_CHARS_PER_TOKEN = 1000  # a prompt longer than this many characters per context token is refused untokenised


# -- errors ------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _overloaded(err: Overloaded) -> APIError:
    return APIError(429, f"{err}; retry later", type="rate_limit_error", code="server_overloaded",
                    headers={"Retry-After": "1"})


class EngineError(RuntimeError):
    """Decoding failed on the server side (not the client's fault)."""


def _status_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


# -- request bodies ------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class _GenerationBody(_Body):
    model: str | None = None
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    top_k: Annotated[int, Field(ge=0)] | None = Field(0, description="sample among the k most likely tokens (0: all)")
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(0.0, description="only 0 is supported")
    frequency_penalty: float | None = Field(0.0, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: leave it empty")
    user: str | None = None
    beta: Annotated[float, Field(ge=BETA_RANGE[0], le=BETA_RANGE[1])] | None = Field(
        None, description="transfertune: steering strength of the value models (value logits / beta); default: "
                          "the server's")
    weights: list[Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]] | None = Field(
        None, description="transfertune: the weight of each value model, in the server's --value order")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (as vLLM's ignore_eos)")


class CompletionRequest(_GenerationBody):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


# -- the server ------------------------------------------------------------------------------------------
def context_window(composed: ComposedModel) -> int | None:
    """The shortest max_position_embeddings among the composed models (None when none declares one)."""
    sizes = []
    for model in composed.models:
        config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
        size = getattr(config, "max_position_embeddings", None)
        if isinstance(size, int) and size > 0:
            sizes.append(size)
    return min(sizes) if sizes else None


class Flight:
    """The rows of one request inside the engine, and the events they send back."""

    def __init__(self, engine: Engine, rows: list[Row]):
        self.engine, self.rows = engine, rows
        self.left = len(rows)  # rows not finished yet
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        sink = Sink(asyncio.get_running_loop(), self.queue)
        for row in rows:
            row.sink = sink
        try:
            engine.submit(rows)
        except Overloaded as err:
            raise _overloaded(err) from None

    async def events(self, request: Request | None = None):
        """Lists of events (all that have arrived) until every row finished; stops early if `request`'s client
        disconnects. Whatever way it ends, the rows leave the engine."""
        try:
            while self.left:
                if request is None:
                    events = await self.queue.get()
                else:
                    try:
                        events = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                while not self.queue.empty():  # a slow reader catches up in one go
                    events = events + self.queue.get_nowait()
                for event in events:
                    if event.error:
                        raise EngineError(event.error)
                    if event.finish_reason:
                        self.left -= 1
                yield events
        finally:
            self.engine.cancel(self.rows)


def _merge_logprobs(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {key: a[key] + b[key] for key in a}


def _by_choice(choices: list["Choice"], events: list[Event]) -> list[tuple["Choice", str, dict | None, str | None]]:
    """Apply events to their choices; per choice touched: (choice, new text, new log-probs, finish reason)."""
    out: dict[int, list] = {}
    for event in events:
        choice = choices[event.index]
        logprobs = choice.apply(event)
        entry = out.setdefault(event.index, [choice, "", None, None])
        entry[1] += event.text
        entry[2] = _merge_logprobs(entry[2], logprobs)
        entry[3] = event.finish_reason or entry[3]
    return [tuple(e) for e in out.values()]


class Choice:
    """One choice being assembled: its text, finish reason and log-probs."""

    def __init__(self, server: "Server", index: int, chat: bool, logprobs: bool, prefix: str = ""):
        self.server, self.index, self.chat = server, index, chat
        self.text, self.finish_reason, self.tokens = prefix, None, 0
        self.logprobs = {"content": []} if chat else {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                       "text_offset": []}
        self.want_logprobs = logprobs
        self.offset = 0  # text_offset of the next token

    def add_token(self, token: int, logprob: float | None, top: list | None, count: bool = True) -> dict:
        """Record one token's log-probs; returns the entry (also the piece a stream chunk carries)."""
        self.tokens += count
        piece = self.server.token_text(token)
        if self.chat:
            entry = {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8")),
                     "top_logprobs": [self._chat_top(i, lp) for i, lp in (top or [])]}
            self.logprobs["content"].append(entry)
            return {"content": [entry]}
        tops = None
        if top is not None:
            tops = {}
            for i, lp in top:  # best first: if two ids share a text, the better one is kept
                tops.setdefault(self.server.token_text(i), lp)
        entry = {"tokens": [piece], "token_logprobs": [logprob], "top_logprobs": [tops], "text_offset": [self.offset]}
        for key, value in entry.items():
            self.logprobs[key] += value
        self.offset += len(piece)
        return entry

    def _chat_top(self, token: int, logprob: float) -> dict:
        piece = self.server.token_text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    def apply(self, event: Event) -> dict | None:
        """Take one engine event; returns the log-probs it adds (None when log-probs were not asked for)."""
        self.text += event.text
        if event.finish_reason:
            self.finish_reason = event.finish_reason
        if event.token is None:
            return None
        if not self.want_logprobs:
            self.tokens += 1
            return None
        return self.add_token(event.token, event.logprob, event.top)

    def json(self) -> dict:
        logprobs = self.logprobs if self.want_logprobs else None
        if self.chat:
            return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                    "logprobs": logprobs, "finish_reason": self.finish_reason}
        return {"index": self.index, "text": self.text, "logprobs": logprobs, "finish_reason": self.finish_reason}


class Server:
    """What the routes share: the engine, the model's name, defaults and limits."""

    def __init__(self, composed: ComposedModel, *, model_name: str, max_batch: int = 32, max_queue: int = 256,
                 max_model_len: int | None = None):
        self.engine = Engine(composed, max_batch=max_batch, max_queue=max_queue)
        self.engine.check_batching()
        self.composed = composed
        # the engine thread decodes with composed.tokenizer; handlers get their own (Rust tokenizers are not
        # safe to share across threads)
        self.tokenizer = copy.deepcopy(composed.tokenizer)
        self.model_name = model_name
        self.n_values = len(composed.values)
        self.beta, self.weights = float(composed.beta), tuple(float(w) for w in composed.weights)
        self.vocab_size = len(self.tokenizer)
        limits = [x for x in (max_model_len, context_window(composed)) if x]
        self.max_model_len = min(limits) if limits else 2048
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self.chat_template, notes = composed.chat_template()
        self.plain_chat_trained = any(v.config.extra.get("chat_format") == "plain" for v in composed.value_models)
        for note in notes:
            log.warning(note)

    def token_text(self, token: int) -> str:
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.decode([token])
        return self._token_text[token]

    # -- request checks ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def encode(self, text: str, param: str) -> list[int]:
        if len(text) > self.max_model_len * MAX_CHARS_PER_TOKEN:
            raise APIError(400, f"the {param} is far longer than the context of {self.max_model_len} tokens",
                           param=param, code="context_length_exceeded")
        try:
            return encode_prompt(self.tokenizer, text)
        except Exception as err:  # e.g. lone surrogates the tokenizer cannot encode
            raise APIError(400, f"the {param} could not be tokenized: {err}", param=param) from None

    def prompts(self, prompt) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt: a string, a list of strings, token ids, or a list of those."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((self.encode(p, "prompt"), p))
                continue
            if not p:
                raise APIError(400, "a prompt of token ids must not be empty", param="prompt")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                               param="prompt")
            out.append((list(p), self.tokenizer.decode(p)))
        return out

    def chat_prompt(self, messages: list[ChatMessage]) -> tuple[list[int], str]:
        """Chats are rendered with the template the value model was trained with (ComposedModel.chat_template),
        else the base's; with neither, a 400 instead of a format no model here has seen."""
        if self.chat_template == PLAIN_CHAT and not self.plain_chat_trained:
            raise APIError(400, f"the base model of `{self.model_name}` has no chat template and the value models "
                                "record none, so chat messages cannot be turned into a prompt; use /v1/completions "
                                "with a plain prompt", param="messages", code="no_chat_template")
        msgs = []
        for m in messages:
            if isinstance(m.content, list):
                if any(part.type != "text" or part.text is None for part in m.content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(part.text for part in m.content)
            else:
                content = m.content or ""
            msgs.append({"role": m.role, "content": content})
        try:
            text = render_chat_prompt(self.tokenizer, msgs, self.chat_template)
        except Exception as err:  # the template itself may refuse (e.g. roles that do not alternate)
            raise APIError(400, f"the chat template rejected these messages: {err}", param="messages") from None
        return self.encode(text, "messages"), text

    def check_length(self, n_prompt: int, max_tokens: int, param: str) -> None:
        if n_prompt + max_tokens > self.max_model_len:
            raise APIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                     f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} for the completion). "
                     "Please reduce the length of the prompt or of the completion.",
                param=param, code="context_length_exceeded")

    def steering(self, body: _GenerationBody) -> tuple[float, tuple[float, ...]]:
        beta = self.beta if body.beta is None else body.beta
        if body.weights is None:
            return beta, self.weights
        if len(body.weights) != self.n_values:
            raise APIError(400, f"weights has {len(body.weights)} entries but the server composes "
                                f"{self.n_values} value model(s)", param="weights")
        return beta, tuple(body.weights)

    def stop(self, stop) -> list[str]:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
        return [s for s in stop if s]

    def unsupported(self, body: _GenerationBody) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def rows(self, body: _GenerationBody, prompts, max_tokens: int, stop, logprobs: int | None) -> list[Row]:
        if len(prompts) * body.n > self.engine.max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} sequences is more than this server queues "
                                f"({self.engine.max_queue})", param="n")
        beta, weights = self.steering(body)
        temperature = 1.0 if body.temperature is None else body.temperature
        temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature
        rows = []
        for p, (ids, _) in enumerate(prompts):
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j) % 2**64
                sampling = SamplingParams(temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                                          top_k=body.top_k or 0, seed=seed)
                rows.append(Row(ids, max_tokens, sampling, stop, beta, weights, logprobs, index=p * body.n + j,
                                ignore_eos=body.ignore_eos))
        return rows

    def envelope(self, kind: str, request_id: str) -> dict:
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": self.model_name}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _Chunks:
    """Server-sent events of one streamed response: the envelope is encoded once, each chunk only adds its
    choices."""

    def __init__(self, head: dict):
        self.head = json.dumps(head)[:-1]  # '{"id": ..., "model": ...' without its closing brace

    def __call__(self, choices: list, **extra) -> str:
        more = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items())
        return f"data: {self.head}, \"choices\": {json.dumps(choices)}{more}}}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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

    app = FastAPI(title="transfertune", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions from a base model composed with value models.")
    app.state.server = server
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        return APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), type=_status_type(err.status_code),
                        headers=getattr(err, "headers", None)).response()

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, err: EngineError):
        return APIError(500, f"decoding failed: {err}", type="server_error").response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):  # still a 500, but in the format clients parse
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, **server.engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "transfertune", "max_model_len": server.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        server.unsupported(body)
        prompts = server.prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        for ids, _ in prompts:
            server.check_length(len(ids), max_tokens, "prompt")
        stop = server.stop(body.stop)
        beta, weights = server.steering(body)
        rows = server.rows(body, prompts, max_tokens, stop, body.logprobs) if max_tokens > 0 else []
        choices = []
        for p, (ids, text) in enumerate(prompts):
            echoed = None
            if body.echo and body.logprobs is not None:
                job = partial(prompt_logprobs, server.composed, ids, body.logprobs, beta=beta, weights=weights)
                try:
                    echoed = await server.engine.run_job(job)
                except Overloaded as err:
                    raise _overloaded(err) from None
            for j in range(body.n):
                choice = Choice(server, p * body.n + j, chat=False, logprobs=body.logprobs is not None,
                                prefix=text if body.echo else "")
                if echoed is not None:
                    for token, entry in zip(ids, echoed):
                        choice.add_token(token, *(entry or (None, None)), count=False)
                choice.offset = len(choice.text)
                choices.append(choice)
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        flight = Flight(server.engine, rows)
        if not rows:
            for choice in choices:
                choice.finish_reason = "length"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream_completion(server, flight, choices, body.echo, request_id, prompt_tokens, include_usage),
                media_type="text/event-stream")
        async for events in flight.events(request):
            for event in events:
                choices[event.index].apply(event)
        return {**server.envelope("text_completion", request_id), "choices": [c.json() for c in choices],
                "usage": _usage(prompt_tokens, sum(c.tokens for c in choices))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        server.check_model(body.model)
        server.unsupported(body)
        ids, text = server.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(server.max_model_len - len(ids), 1)
        server.check_length(len(ids), max_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        rows = server.rows(body, [(ids, text)], max_tokens, server.stop(body.stop), top)
        choices = [Choice(server, j, chat=True, logprobs=bool(body.logprobs)) for j in range(body.n)]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        flight = Flight(server.engine, rows)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream_chat(server, flight, choices, request_id, len(ids), include_usage),
                                     media_type="text/event-stream")
        async for events in flight.events(request):
            for event in events:
                choices[event.index].apply(event)
        return {**server.envelope("chat.completion", request_id), "choices": [c.json() for c in choices],
                "usage": _usage(len(ids), sum(c.tokens for c in choices))}

    return app


async def _stream_completion(server: Server, flight: Flight, choices: list[Choice], echo: bool, request_id: str,
                             prompt_tokens: int, include_usage: bool):
    """The chunks of a streamed completion. Everything one engine step produced for this request goes out in one
    write (one chunk per choice that changed); the last step's write also carries the usage and `[DONE]`."""
    sse = _Chunks(server.envelope("text_completion", request_id))

    def chunk(index: int, text: str, logprobs, finish_reason) -> str:
        return sse([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])

    parts = []
    try:
        for c in choices:
            if echo or c.finish_reason:
                parts.append(chunk(c.index, c.text, c.logprobs if c.want_logprobs else None, c.finish_reason))
        if parts and flight.left:
            yield "".join(parts)
            parts = []
        async for events in flight.events():
            for choice, text, logprobs, finish_reason in _by_choice(choices, events):
                if text or finish_reason or logprobs:
                    parts.append(chunk(choice.index, text, logprobs, finish_reason))
            if parts and flight.left:
                yield "".join(parts)
                parts = []
        if include_usage:
            parts.append(sse([], usage=_usage(prompt_tokens, sum(c.tokens for c in choices))))
    except EngineError as err:
        parts.append(_sse(APIError(500, f"decoding failed: {err}", type="server_error").body()))
    parts.append("data: [DONE]\n\n")
    yield "".join(parts)


async def _stream_chat(server: Server, flight: Flight, choices: list[Choice], request_id: str, prompt_tokens: int,
                       include_usage: bool):
    """The chunks of a streamed chat completion, written as `_stream_completion` writes them."""
    sse = _Chunks(server.envelope("chat.completion.chunk", request_id))

    def chunk(index: int, delta: dict, logprobs, finish_reason) -> str:
        return sse([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    parts = [chunk(c.index, {"role": "assistant", "content": ""}, None, None) for c in choices]
    try:
        if flight.left:
            yield "".join(parts)
            parts = []
        async for events in flight.events():
            for choice, text, logprobs, finish_reason in _by_choice(choices, events):
                if text or logprobs:
                    parts.append(chunk(choice.index, {"content": text}, logprobs, None))
                if finish_reason:
                    parts.append(chunk(choice.index, {}, None, finish_reason))
            if parts and flight.left:
                yield "".join(parts)
                parts = []
        if include_usage:
            parts.append(sse([], usage=_usage(prompt_tokens, sum(c.tokens for c in choices))))
    except EngineError as err:
        parts.append(_sse(APIError(500, f"decoding failed: {err}", type="server_error").body()))
    parts.append("data: [DONE]\n\n")
    yield "".join(parts)


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
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(composed: ComposedModel, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **app_kwargs) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(composed, **app_kwargs), host=host, port=port, log_level=log_level)
