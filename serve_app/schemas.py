"""OpenAI-compatible request models (pydantic, strict) and the error shape.

Requests are validated strictly: wrong JSON types are errors (no "5" -> 5 coercion), unknown
fields are errors, and the failures become `ApiError(400, ...)` naming the field. Extensions
beyond OpenAI's API, sent by clients in the body (the `openai` client's `extra_body`):
- `top_k` (int, 0 = off): sample from the k most likely tokens;
- `ignore_eos` (bool): do not stop at the end-of-turn token (fixed-length output, benchmarks).
Assistant messages may carry their tool use as content parts
`{"type": "text" | "python" | "python_output", "text": ...}`, as the web page sends them back.

Error bodies follow OpenAI: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "overloaded_error"}


class ApiError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(_Request):
    type: Literal["text", "python", "python_output"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    n: Annotated[int, Field(ge=1)] = 1
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0  # accepted for clients that send 0
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must be non-empty", "invalid_value", "stop")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=0)] | None = None  # only the chosen token's log-prob

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=1)] | None = None  # 0/1: the chosen token's log-prob
    echo: Literal[False] = False
    suffix: None = None

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def parse_request(cls: type[_Request], body: bytes) -> _Request:
    """Bytes -> validated request, or ApiError(400) naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON",
                       "invalid_encoding") from None
    try:
        return cls.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"request body is not valid JSON: {first['msg']}", "invalid_json") from None
        problems = "; ".join(f"{_loc(err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        more = f" (and {e.error_count() - 5} more)" if e.error_count() > 5 else ""
        raise ApiError(400, f"invalid request: {problems}{more}", "invalid_request",
                       _loc(first["loc"]) or None) from None


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)
