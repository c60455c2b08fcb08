"""OpenAI-compatible request models (pydantic, strict) and the error shape.

Requests are validated strictly: wrong JSON types are errors (no "5" -> 5 coercion), unknown
fields are errors, and the failures become `ApiError(400, ...)` naming the field. Extensions
beyond OpenAI's API, sent by clients in the body (the `openai` client's `extra_body`):
- `top_k` (int, 0 = off): sample from the k most likely tokens;
- `ignore_eos` (bool): do not stop at the end-of-turn token (fixed-length output, benchmarks).
Assistant messages may carry their tool use as content parts
`{"type": "text" | "python" | "python_output", "text": ...}`, as the web page sends them back.

Agents' fields, as OpenAI defines them: `response_format` (`text`, `json_object`, `json_schema`
with `strict`), `tools` + `tool_choice` + `parallel_tool_calls`, assistant `tool_calls` and
`role: "tool"` messages in the history, `logprobs` + `top_logprobs` (0..20; completions:
`logprobs` 0..20). Their meaning in this service is in serve_app/grammar.py and the README.

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
        return {"error": {"message": self.message,
                          "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(_Request):
    type: Literal["text", "python", "python_output"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant only
    tool_call_id: str | None = None  # tool only

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDef(_Request):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat,
                           Field(discriminator="type")]


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
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, "
                                 f"which is not among tools {names}")
        if self.tools:
            names = [t.function.name for t in self.tools]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"tools define {dup} more than once")
        return self

    @property
    def tool_mode(self) -> str:
        """"none" (no tools, or tool_choice none), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None:
            return "auto"
        return "named" if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    # the k most likely tokens too (0: chosen only)
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
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
