"""From a validated OpenAI request to engine rows and back to a response: `Server` holds what requests share
(the engine, the value models and the model ids they make, the tokenizer, limits) and checks requests against
them; `completion` and `chat_completion` submit the rows and assemble the response, whole or as server-sent
events (one streaming loop for both). Log-probs are those of the *composed* distribution (before temperature /
top-p), of the value models the request chose (`model_table.py`).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING

from transfertune.inference.composed_model import ComposedModel
from transfertune.io.data import PLAIN_CHAT, encode_prompt, render_chat_prompt
from transfertune.serving.engine import (
    Draft,
    Engine,
    Event,
    Overloaded,
    Row,
    Sink,
    prompt_logprobs,
)
from transfertune.serving.model_table import ModelTable
from transfertune.serving.protocol import (
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    usage,
)
from transfertune.serving.value_registry import ServedModel, ValueRegistry

if TYPE_CHECKING:
    from fastapi import Request

log = logging.getLogger(__name__)

MAX_CHARS_PER_TOKEN = 1000  # a prompt longer than this many characters per context token is refused untokenised


class EngineError(RuntimeError):
    """Decoding failed on the server side (not the client's fault)."""


def overloaded(err: Overloaded) -> APIError:
    return APIError(429, f"{err}; retry later", type="rate_limit_error", code="server_overloaded",
                    headers={"Retry-After": "1"})


def context_window(composed: ComposedModel) -> int | None:
    """The shortest max_position_embeddings among the composed models (None when none declares one)."""
    sizes = []
    for model in composed.models:
        config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
        size = getattr(config, "max_position_embeddings", None)
        if isinstance(size, int) and size > 0:
            sizes.append(size)
    return min(sizes) if sizes else None


class Server:
    """What the routes share: the engine, the value models and model ids, defaults and limits.

    The server keeps the base (and proxy pair) of `composed`; its value models move into a `ValueRegistry`
    (named `value_names`, default their directories' names), from which requests choose and which
    /v1/load_value and /v1/unload_value change. `beta` (the --beta flag) is every value model's default beta;
    None: each its own. `composed`'s value models at its weights and beta stay the default model, `model_name`.
    With a `draft` (--draft), requests composing the default model's value models decode speculatively
    (engine.py); a ValueError says why the draft cannot serve these models."""

    def __init__(self, composed: ComposedModel, *, model_name: str, value_names=None, beta: float | None = None,
                 vocab_map=None, max_batch: int = 32, max_queue: int = 256, max_model_len: int | None = None,
                 draft: Draft | None = None):
        self.registry = ValueRegistry.of_composed(composed, value_names, beta=beta, vocab_map=vocab_map)
        default = ServedModel(model_name, tuple(self.registry.names()), tuple(float(w) for w in composed.weights),
                              float(composed.beta))
        self.models = ModelTable(self.registry, default, composed.base_name)
        limits = [x for x in (max_model_len, context_window(composed)) if x]
        self.max_model_len = min(limits) if limits else 2048
        # the value models live in the registry only, so that unloading one frees it
        self.composed = ComposedModel(composed.base, composed.tokenizer, [], proxy=composed.proxy,
                                      alpha=composed.alpha, base_name=composed.base_name)
        self.engine = Engine(self.composed, registry=self.registry, default=default, max_batch=max_batch,
                             max_queue=max_queue, draft=draft)
        self.engine.check_batching()
        # the engine thread decodes with composed.tokenizer; handlers get their own (Rust tokenizers are not
        # safe to share across threads)
        self.tokenizer = copy.deepcopy(composed.tokenizer)
        self.model_name = model_name
        self.vocab_size = len(self.tokenizer)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self.models.chat_template(default.values)  # logs its notes at start-up

    def token_text(self, token: int) -> str:
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.decode([token])
        return self._token_text[token]

    def envelope(self, kind: str, request_id: str, model: str | None = None) -> dict:
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": model or self.model_name}

    # -- request checks ------------------------------------------------------------------------------
    def choose(self, body: GenerationRequest) -> ServedModel:
        """The model and value models a request composes (404 for an unknown model, 409 for one being
        unloaded, 400 for weights that do not fit)."""
        return self.models.resolve(body.model, body.value, body.weights, body.beta)

    def encode(self, text: str, param: str) -> list[int]:
        if len(text) > self.max_model_len * MAX_CHARS_PER_TOKEN:
            raise APIError(400, f"the {param} is far longer than the context of {self.max_model_len} tokens",
                           param=param, code="context_length_exceeded")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise APIError(400, f"the {param} is not valid Unicode text: character {err.start} is a lone surrogate "
                                f"(\\u{ord(text[err.start]):04x}), which cannot be encoded", param=param) from None
        try:
            return encode_prompt(self.tokenizer, text)
        except Exception as err:  # noqa: BLE001 (the tokenizer may refuse other text)
            raise APIError(400, f"the {param} could not be tokenized: {err}", param=param) from None

    def prompts(self, prompt) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt: a string, a list of strings, token ids, or a list of those."""
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
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

    def chat_prompt(self, messages: list[ChatMessage], chosen: ServedModel) -> tuple[list[int], str]:
        """Chats are rendered with the template the (first) value model was trained with (ComposedModel.
        chat_template), else the base's; with neither, a 400 instead of a format no model here has seen."""
        template, plain_trained = self.models.chat_template(chosen.values)
        if template == PLAIN_CHAT and not plain_trained:
            raise APIError(400, f"the base model of `{chosen.id}` has no chat template and the value models "
                                "record none, so chat messages cannot be turned into a prompt; use /v1/completions "
                                "with a plain prompt", param="messages", code="no_chat_template")
        msgs = [{"role": m.role, "content": m.content_text()} for m in messages]
        try:
            text = render_chat_prompt(self.tokenizer, msgs, template)
        except Exception as err:  # noqa: BLE001 (the template may refuse, e.g. roles that do not alternate)
            raise APIError(400, f"the chat template rejected these messages: {err}", param="messages") from None
        return self.encode(text, "messages"), text

    def check_length(self, n_prompt: int, max_tokens: int, param: str) -> None:
        if n_prompt + max_tokens > self.max_model_len:
            raise APIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                     f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} for the completion). "
                     "Please reduce the length of the prompt or of the completion.",
                param=param, code="context_length_exceeded")

    def rows(self, body: GenerationRequest, prompts, max_tokens: int, stop, logprobs: int | None,
             chosen: ServedModel) -> list[Row]:
        """The engine rows of a request: `n` per prompt, numbered as the response's choices."""
        if len(prompts) * body.n > self.engine.max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} sequences is more than this server queues "
                                f"({self.engine.max_queue})", param="n")
        return [Row(ids, max_tokens, body.sampling_params(j), stop, chosen.beta, chosen.weights, logprobs,
                    index=p * body.n + j, ignore_eos=body.ignore_eos, values=chosen.values)
                for p, (ids, _) in enumerate(prompts) for j in range(body.n)]


class Choice:
    """One choice being assembled: its text, finish reason and log-probs."""

    def __init__(self, server: Server, index: int, chat: bool, logprobs: bool, prefix: str = ""):
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

    def first_chunks(self, echo: bool) -> list[dict]:
        """What a stream says of this choice before decoding: the assistant role (chat), the echoed prompt, or
        the finish of a completion with nothing to decode."""
        if self.chat:
            return [{"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]
        if echo or self.finish_reason:
            return [{"index": self.index, "text": self.text, "logprobs": self.logprobs if self.want_logprobs else None,
                     "finish_reason": self.finish_reason}]
        return []

    def chunks(self, text: str, logprobs: dict | None, finish_reason: str | None) -> list[dict]:
        """What a stream says of what one step added (chats send the finish in a chunk of its own)."""
        if not self.chat:
            if text or finish_reason or logprobs:
                return [{"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
            return []
        out = []
        if text or logprobs:
            out.append({"index": self.index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None})
        if finish_reason:
            out.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": finish_reason})
        return out


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
            raise overloaded(err) from None

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
                    except TimeoutError:
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


def _by_choice(choices: list[Choice], events: list[Event]) -> list[tuple[Choice, str, dict | None, str | None]]:
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


# -- server-sent events --------------------------------------------------------------------------------
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


async def _stream_completion(server: Server, flight: Flight, choices: list[Choice], echo: bool, request_id: str,
                             prompt_tokens: int, include_usage: bool, model: str | None = None):
    """The chunks of a streamed completion or chat completion (as its choices are). Everything one engine step
    produced for this request goes out in one write (one chunk per choice that changed); the last step's write
    also carries the usage and `[DONE]`."""
    sse = _Chunks(server.envelope("chat.completion.chunk" if choices[0].chat else "text_completion", request_id,
                                  model))
    parts = [sse([chunk]) for c in choices for chunk in c.first_chunks(echo)]
    try:
        if parts and flight.left:
            yield "".join(parts)
            parts = []
        async for events in flight.events():
            for choice, text, logprobs, finish_reason in _by_choice(choices, events):
                parts += [sse([chunk]) for chunk in choice.chunks(text, logprobs, finish_reason)]
            if parts and flight.left:
                yield "".join(parts)
                parts = []
        if include_usage:
            parts.append(sse([], usage=usage(prompt_tokens, sum(c.tokens for c in choices))))
    except EngineError as err:
        parts.append(_sse(APIError(500, f"decoding failed: {err}", type="server_error").body()))
    parts.append("data: [DONE]\n\n")
    yield "".join(parts)


# -- the two generation routes ---------------------------------------------------------------------------
async def completion(server: Server, body: CompletionRequest, request: Request) -> dict | AsyncIterator[str]:
    chosen = server.choose(body)
    body.check_supported()
    prompts = server.prompts(body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    for ids, _ in prompts:
        server.check_length(len(ids), max_tokens, "prompt")
    stop = body.stop_strings()
    rows = server.rows(body, prompts, max_tokens, stop, body.logprobs, chosen) if max_tokens > 0 else []
    choices = []
    for p, (ids, text) in enumerate(prompts):
        choices += await _completion_choices(server, body, p, ids, text, chosen)
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    return await _respond(server, body, request, rows, choices, prompt_tokens, "cmpl", "text_completion", chosen,
                          echo=body.echo)


async def _completion_choices(server: Server, body: CompletionRequest, p: int, ids: list[int], text: str,
                              chosen: ServedModel) -> list[Choice]:
    """The `n` choices of prompt `p`, starting with the prompt (and its log-probs) when it is echoed."""
    echoed = None
    if body.echo and body.logprobs is not None:
        job = partial(prompt_logprobs, server.composed, ids, body.logprobs, beta=chosen.beta, weights=chosen.weights,
                      values=server.registry.modules(chosen.values))
        try:
            echoed = await server.engine.run_job(job)
        except Overloaded as err:
            raise overloaded(err) from None
    choices = []
    for j in range(body.n):
        choice = Choice(server, p * body.n + j, chat=False, logprobs=body.logprobs is not None,
                        prefix=text if body.echo else "")
        if echoed is not None:
            for token, entry in zip(ids, echoed):
                choice.add_token(token, *(entry or (None, None)), count=False)
        choice.offset = len(choice.text)
        choices.append(choice)
    return choices


async def chat_completion(server: Server, body: ChatRequest, request: Request) -> dict | AsyncIterator[str]:
    chosen = server.choose(body)
    body.check_supported()
    ids, text = server.chat_prompt(body.messages, chosen)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = max(server.max_model_len - len(ids), 1)
    server.check_length(len(ids), max_tokens, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    rows = server.rows(body, [(ids, text)], max_tokens, body.stop_strings(), top, chosen)
    choices = [Choice(server, j, chat=True, logprobs=bool(body.logprobs)) for j in range(body.n)]
    return await _respond(server, body, request, rows, choices, len(ids), "chatcmpl", "chat.completion", chosen)


async def _respond(server: Server, body: GenerationRequest, request: Request, rows: list[Row], choices: list[Choice],
                   prompt_tokens: int, id_prefix: str, kind: str, chosen: ServedModel,
                   echo: bool = False) -> dict | AsyncIterator[str]:
    """Submit the rows; the stream of chunks, or the whole response once every row finished."""
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    # checked again right before submitting (no await in between): an unload that began while this request
    # awaited (echo's prompt scoring) either sees its rows queued or refuses them here
    server.models.check_available(chosen.values, chosen.id)
    flight = Flight(server.engine, rows)
    if not rows:  # max_tokens=0: nothing to decode
        for choice in choices:
            choice.finish_reason = "length"
    if body.stream:
        return _stream_completion(server, flight, choices, echo, request_id, prompt_tokens, body.include_usage,
                                  chosen.id)
    async for events in flight.events(request):
        for event in events:
            choices[event.index].apply(event)
    return {**server.envelope(kind, request_id, chosen.id), "choices": [c.json() for c in choices],
            "usage": usage(prompt_tokens, sum(c.tokens for c in choices))}
