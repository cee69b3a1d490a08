"""The OpenAI API as `transfertune serve` speaks it: request bodies (pydantic), their limits, the checks that need
no model, and the error and usage objects of responses.

Beyond OpenAI's fields a request may carry `beta` (steering strength), `weights` (one per value model of its
`model`) or `value` (value models by name, with their weights), and `top_k` and `ignore_eos` as vLLM's. The admin
routes /v1/load_value and /v1/unload_value take `name` (and `path`).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from transfertune.inference.sampling import SamplingParams

MAX_LOGPROBS = 20
MAX_STOP = 16
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (logits / tiny temperature would overflow)
BETA_RANGE = (1e-3, 1e3)  # with |weight| <= MAX_WEIGHT, w / beta keeps composed logits far from float32 overflow
MAX_WEIGHT = 100.0
MAX_VALUES_PER_REQUEST = 16


# -- errors ------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error response in OpenAI's JSON format."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


JSON_BODY = "the request body must be a JSON object, sent with `Content-Type: application/json`"

# fields that take one of several shapes: what they accept, in the API's words (pydantic would name the first
# shape it tried, e.g. `prompt.str: Input should be a valid string` for a list of negative token ids)
SHAPES = {
    ("prompt",): "a string, a list of strings, a list of token ids (integers >= 0) or a list of token-id lists",
    ("stop",): "a string or a list of strings",
    ("messages", int, "content"): 'a string or a list of text parts ({"type": "text", "text": "..."})',
}


def _shape(loc: tuple) -> tuple[tuple, str] | None:
    """(the field's location, what it accepts) when `loc` lies inside one of SHAPES."""
    for pattern, accepted in SHAPES.items():
        head = loc[: len(pattern)]
        if len(head) == len(pattern) and all(
                isinstance(x, int) if p is int else x == p for x, p in zip(head, pattern)):
            return head, accepted
    return None


def _json_text(value, limit: int = 60) -> str:
    import json

    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_error(errors: list[dict]) -> APIError:
    """A 400 naming the first field pydantic rejected (`messages.0.role: Field required`), in the API's terms: a
    field of several shapes lists them, a body that is not an object says so."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(x for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first["msg"])
        at = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return APIError(400, f"the request body is not valid JSON ({detail}{at})")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return APIError(400, JSON_BODY)
    shape = _shape(loc)
    if shape is not None:
        where = ".".join(str(x) for x in shape[0])
        got = f", got {_json_text(first['input'])}" if "input" in first else ""
        return APIError(400, f"{where} must be {shape[1]}{got}", param=where)
    where = ".".join(str(x) for x in loc)
    msg = first["msg"]
    if first.get("type") == "model_attributes_type":
        msg = "must be a JSON object"
    return APIError(400, f"{where}: {msg}" if where else msg, param=where or None)


# -- request bodies ------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class GenerationRequest(_Body):
    """The fields completions and chat completions share."""

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
        None, description="transfertune: the weight of each value model of `model`, in its order (the default "
                          "model's: the server's --value order)")
    value: Annotated[dict[str, Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]],
                     Field(max_length=MAX_VALUES_PER_REQUEST)] | None = Field(
        None, description="transfertune: compose these loaded value models, by name, with these weights (e.g. "
                          "{\"qa\": 1.0, \"style\": 0.5}; {} = the base alone), instead of the model's own")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (as vLLM's ignore_eos)")

    def check_supported(self) -> None:
        """A 400 for OpenAI options this server does not implement, rather than ignoring them."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
        return [s for s in stop if s]

    def sampling_params(self, j: int) -> SamplingParams:
        """The sampling rule of the request's `j`-th sequence (their seeds count up from `seed`)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature
        seed = None if self.seed is None else (self.seed + j) % 2**64
        return SamplingParams(temperature=temperature, top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=self.top_k or 0, seed=seed)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
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

    def content_text(self) -> str:
        """The content as one string (only text parts are supported)."""
        if not isinstance(self.content, list):
            return self.content or ""
        if any(part.type != "text" or part.text is None for part in self.content):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(part.text for part in self.content)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class LoadValueRequest(_Body):
    name: str = Field(description="the value model's name: requests then pick it as `model: BASE+NAME`")
    path: str = Field(description="its value directory, on the server's machine")


class UnloadValueRequest(_Body):
    name: str


# -- response pieces ---------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
