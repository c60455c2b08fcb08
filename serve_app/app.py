"""The Ray Serve application: an OpenAI-compatible chat API over continuous batching, plus the web page.

    serve run serve_app.app:build_app          # with a Serve config file giving `args` (see jobs/serve.py)
    python -m jobs.serve --run R --stage sft   # the usual way: fills ServeConfig from a run

Routes (FastAPI behind `@serve.ingress`):
    GET  /                      the chat page (serve_app/static/index.html)
    GET  /health                200 while every loaded model's scheduler runs
    GET  /v1/models             the configured checkpoints
    POST /v1/chat/completions   chat models; SSE streaming or one JSON answer
    POST /v1/completions        any model (base checkpoints have no chat format)
    GET  /debug/steps           the scheduler's step log (?model=..&last=N)

Notable:
- one deployment, `ChatServer`; each replica loads a model on its first request for it (Serve
  model multiplexing, LRU over `max_models_per_replica`); the page sends the
  `serve_multiplexed_model_id` header so Serve routes to replicas that already hold the model.
- each loaded model has one Scheduler thread that owns its engine batch (serve_app/scheduler.py);
  requests only submit prompts and read token events.
- validation before any work: API key (401), body size (413), UTF-8/JSON/types (400), model (404),
  limits on messages, characters and context (400); a full waiting queue answers 429 and Serve's
  own queue (`max_queued_requests`) 503. Every error has OpenAI's error body.
- a client that disconnects cancels its handler; the generation's `finally` frees its slots.
- agents' features: `response_format` and `tools` compile to one llguidance grammar per request
  (serve_app/grammar.py), enforced per row by the engine's sampler; function calling maps onto
  the tool tokens (serve_app/conversation.py documents how); log-probs come with up to 20 alternatives.
"""

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.sampling import SamplingParams
from serve_app import responses as R
from serve_app.config import ServeConfig
from serve_app.conversation import message_chars, to_conversation
from serve_app.generation import Generation, GenerationFailed
from serve_app.grammar import Grammar, GrammarError
from serve_app.metrics import ServeMetrics, process_metrics
from serve_app.models import ServedModel
from serve_app.scheduler import Overloaded, SchedulerClosed
from serve_app.schemas import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    Tool,
    parse_request,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

api = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "not_found"
                   if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _query_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    return JSONResponse(ApiError(400, f"invalid request: {problems}", "invalid_request").body(),
                        status_code=400)


class _CountStatus:
    """ASGI middleware: count every /v1 answer by status (pure ASGI, so streaming is untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics = process_metrics()
            if metrics is not None:
                metrics.request(scope.get("state", {}).get("model", ""), status["code"])


api.add_middleware(_CountStatus)


@serve.deployment(name="ChatServer")
@serve.ingress(api)
class ChatServer:
    """One replica: the models it loaded, their schedulers, and the HTTP routes."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        torch.set_num_threads(config.threads)
        self.metrics = ServeMetrics()
        self.created = int(time.time())
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._headers = {"x-nanochat-replica": self.replica_id}  # which replica answered (debugging, tests)
        self._keys = [k.encode() for k in config.api_keys]
        self._loaded: dict[str, ServedModel] = {}
        self._page = (STATIC_DIR / "index.html").read_bytes()

        async def load(model_id: str) -> ServedModel:
            return await self._load(model_id)

        per_replica = config.max_models_per_replica or len(config.models)
        self._get_model = serve.multiplexed(max_num_models_per_replica=per_replica)(load)

    async def _load(self, name: str) -> ServedModel:
        spec = self.config.model(name)
        served = await asyncio.to_thread(ServedModel.load, spec, self.config)
        served.scheduler.on_step = self.metrics.watch(name, served.scheduler.waiting)
        self._loaded[name] = served

        def unloaded() -> None:  # the multiplexer evicted it (LRU) or the replica shut it down
            self._loaded.pop(name, None)
            self.metrics.forget(name)

        served.on_close = unloaded
        return served

    def check_health(self) -> None:
        """Serve's health check: a scheduler thread that died makes the replica unhealthy."""
        dead = [n for n, m in self._loaded.items() if m.scheduler.error is not None]
        if dead:
            raise RuntimeError(f"scheduler thread died for {dead}: {self._loaded[dead[0]].scheduler.error}")

    # ---- routes --------------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)

    @api.get("/health")
    async def health(self) -> JSONResponse:
        loaded = {n: m.scheduler.alive for n, m in self._loaded.items()}
        ok = all(loaded.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models_loaded": loaded},
                            status_code=200 if ok else 503)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        data = [{"id": m.name, "object": "model", "created": self.created, "owned_by": "nanochat",
                 "nanochat_kind": m.kind} for m in self.config.models]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/debug/steps")
    async def steps(self, request: Request, model: str, last: int = 200) -> JSONResponse:
        self._authorize(request)
        served = self._loaded.get(model)
        records = served.scheduler.step_log(max(1, min(last, 100_000))) if served else []
        return JSONResponse({"model": model, "replica": self.replica_id,
                             "steps": [r.as_dict() for r in records]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        arrived = time.monotonic()
        self._authorize(request)
        req = parse_request(ChatCompletionRequest, await self._body(request))
        request.state.model = req.model
        served = await self._model(req.model, "/v1/chat/completions")
        prompt = self._chat_prompt(served, req.messages, req.tools)
        params = self._params(served, req, [prompt], req.token_budget, req.logprobs, req.top_logprobs or 0)
        grammar = await asyncio.to_thread(self._grammar, served, req)
        gen = self._start(served, "chatcmpl", [prompt], params, req.stop_list(), req.logprobs, arrived,
                          grammar, req.tool_mode != "none")
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(gen, req.model, usage, req.logprobs),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **self._headers})
        choices = await self._collect(gen)
        return JSONResponse(R.chat_response(gen.request_id, int(time.time()), req.model, choices,
                                            R.usage(gen.prompt_tokens, gen.completion_tokens,
                                                    gen.cached_tokens), req.logprobs),
                            headers=self._headers)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        arrived = time.monotonic()
        self._authorize(request)
        req = parse_request(CompletionRequest, await self._body(request))
        request.state.model = req.model
        served = await self._model(req.model, "/v1/completions")
        texts = req.prompts()
        limits = self.config.limits
        if len(texts) > limits.max_prompts:
            raise ApiError(400, f"{len(texts)} prompts; at most {limits.max_prompts} per request",
                           "too_many_prompts", "prompt")
        self._check_chars(sum(len(t) for t in texts), "prompt")
        prompts = [served.tokenizer.encode(t, prepend="<|bos|>") for t in texts]
        logprobs = req.logprobs is not None
        params = self._params(served, req, prompts, req.token_budget, logprobs, req.logprobs or 0)
        gen = self._start(served, "cmpl", prompts, params, req.stop_list(), logprobs, arrived)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._text_stream(gen, req.model, usage, logprobs),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **self._headers})
        choices = await self._collect(gen)
        return JSONResponse(R.completion_response(gen.request_id, int(time.time()), req.model, choices,
                                                  R.usage(gen.prompt_tokens, gen.completion_tokens,
                                                          gen.cached_tokens), logprobs),
                            headers=self._headers)

    # ---- request checks ------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
        given = key.strip().encode()
        if not any(hmac.compare_digest(given, k) for k in self._keys):
            raise ApiError(401, "incorrect API key provided", "invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _model(self, name: str, route: str) -> ServedModel:
        spec = self.config.model(name)
        if spec is None:
            names = ", ".join(m.name for m in self.config.models)
            raise ApiError(404, f"the model '{name}' does not exist; available: {names}", "model_not_found",
                           "model")
        if route == "/v1/chat/completions" and spec.kind == "base":
            raise ApiError(400,
                           f"model '{name}' is a base checkpoint without a chat format; use /v1/completions",
                           "model_not_chat", "model")
        try:
            return await self._get_model(name)
        except Exception as e:  # noqa: BLE001 - a broken checkpoint is the server's fault, say which
            raise ApiError(500, f"model '{name}' failed to load: {type(e).__name__}: {e}",
                           "model_load_failed") from e

    def _check_chars(self, chars: int, param: str) -> None:
        limit = self.config.limits.max_chars
        if chars > limit:
            raise ApiError(400, f"{chars} characters of input; at most {limit} are accepted",
                           "input_too_long", param)

    def _chat_prompt(self, served: ServedModel, messages: list[ChatMessage],
                     tools: list[Tool] | None) -> list[int]:
        limits = self.config.limits
        if len(messages) > limits.max_messages:
            raise ApiError(400, f"{len(messages)} messages; at most {limits.max_messages} per request",
                           "too_many_messages", "messages")
        self._check_chars(sum(message_chars(m) for m in messages), "messages")
        conversation = to_conversation(messages, tools)
        if conversation[-1]["role"] == "assistant" and messages[-1].role != "tool":
            raise ApiError(400, "the last message must be from the user (or a tool's result)",
                           "invalid_value", "messages")
        try:
            return served.tokenizer.render_for_completion(
                {"messages": conversation}, continue_last=conversation[-1]["role"] == "assistant")
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_value", "messages") from None

    def _grammar(self, served: ServedModel, req: ChatCompletionRequest) -> Grammar | None:
        """The request's grammar (None: free text); GrammarError -> 400 naming the problem."""
        fmt, mode = req.response_format, req.tool_mode
        structured = isinstance(fmt, JsonObjectFormat | JsonSchemaResponseFormat)
        if (structured or mode != "none") and req.ignore_eos:
            raise ApiError(400, "ignore_eos cannot be combined with response_format or tools: a grammar ends "
                           "the reply with the end-of-turn token", "invalid_value", "ignore_eos")
        if structured and mode != "none":
            raise ApiError(400, "response_format json_object/json_schema together with tools is not "
                           "supported; send tool_choice 'none' or drop response_format", "invalid_value",
                           "response_format")
        try:
            if isinstance(fmt, JsonObjectFormat):
                return served.grammars.json_object()
            if isinstance(fmt, JsonSchemaResponseFormat):
                if fmt.json_schema.schema_ is None:
                    raise ApiError(400, "response_format.json_schema.schema is required", "invalid_value",
                                   "response_format")
                return served.grammars.json_schema(fmt.json_schema.schema_)
            if mode == "none":
                return None
            functions = [{"name": t.function.name, "parameters": t.function.parameters} for t in req.tools]
            if mode == "named":
                functions = [f for f in functions if f["name"] == req.tool_choice.function.name]
            return served.grammars.tool_calls(functions, "auto" if mode == "auto" else "required",
                                              req.parallel_tool_calls)
        except GrammarError as e:
            raise ApiError(400, str(e), "invalid_schema",
                           "response_format" if structured else "tools") from None

    def _params(self, served: ServedModel, req: Any, prompts: list[list[int]], budget: int | None,
                logprobs: bool, top_logprobs: int = 0) -> SamplingParams:
        room = served.max_seq_len - max(len(p) for p in prompts)  # tokens the longest prompt leaves
        if room < 1:
            raise ApiError(400, f"the prompt has {served.max_seq_len - room} tokens but the model's context "
                           f"is {served.max_seq_len}; shorten the conversation", "context_length_exceeded",
                           "messages")
        if budget is not None and budget > room:
            raise ApiError(400, f"max_tokens {budget} + prompt {served.max_seq_len - room} tokens exceed the "
                           f"context of {served.max_seq_len}; ask for at most {room}",
                           "context_length_exceeded", "max_tokens")
        max_n = min(self.config.limits.max_n, self.config.max_batch_size)
        if req.n > max_n:
            raise ApiError(400, f"n = {req.n}; at most {max_n} choices per prompt", "invalid_value", "n")
        return SamplingParams(
            max_new_tokens=budget or min(self.config.limits.default_max_tokens, room),
            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
            stop_token_ids=() if req.ignore_eos else served.stop_ids, n=req.n, logprobs=logprobs,
            top_logprobs=top_logprobs)

    def _start(self, served: ServedModel, prefix: str, prompts: list[list[int]], params: SamplingParams,
               stop: list[str], logprobs: bool, arrived: float, grammar: Grammar | None = None,
               tool_calls: bool = False) -> Generation:
        gen = Generation(served, f"{prefix}-{uuid.uuid4().hex}", prompts, params, stop, logprobs,
                         self.metrics, arrived, grammar, tool_calls)
        try:
            gen.start()
        except Overloaded as e:
            raise ApiError(429, f"overloaded: {e}; retry with backoff", "overloaded") from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e), "unavailable") from None
        return gen

    async def _collect(self, gen: Generation) -> list:
        try:
            return await gen.collect()
        except GenerationFailed as e:
            raise ApiError(500, str(e), "generation_failed") from None

    # ---- streaming -----------------------------------------------------------------------------

    async def _chat_stream(self, gen: Generation, model: str, with_usage: bool,
                           logprobs: bool) -> AsyncIterator[bytes]:
        rid, created = gen.request_id, int(time.time())
        n = len(gen.prompts) * gen.params.n
        yield b"".join(R.sse(R.chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""},
                                          with_usage=with_usage)) for i in range(n))
        try:
            async for updates in gen.updates():
                out = []
                for u in updates:
                    for p in u.pieces:
                        lps = R.chat_logprobs(p.logprobs) if logprobs and p.kind == "text" else None
                        out.append(R.sse(R.chat_chunk(rid, created, model, u.index, R.piece_delta(p), None,
                                                      lps, with_usage)))
                    if u.finish_reason:
                        out.append(R.sse(R.chat_chunk(rid, created, model, u.index, {}, u.finish_reason,
                                                      with_usage=with_usage)))
                yield b"".join(out)
        except GenerationFailed as e:
            yield R.sse(ApiError(500, str(e), "generation_failed").body())
            return
        finally:
            gen.cancel()  # closed early (client gone): free the slots now, not when the GC runs
        if with_usage:
            yield R.sse(R.usage_chunk(rid, created, model, "chat.completion.chunk",
                                      R.usage(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens)))
        yield R.DONE

    async def _text_stream(self, gen: Generation, model: str, with_usage: bool,
                           logprobs: bool) -> AsyncIterator[bytes]:
        rid, created = gen.request_id, int(time.time())
        offsets: dict[int, int] = {}
        try:
            async for updates in gen.updates():
                out = []
                for u in updates:
                    text = "".join(p.text for p in u.pieces if p.kind == "text")
                    lp_list = [lp for p in u.pieces if p.kind == "text" for lp in p.logprobs]
                    lps = R.completion_logprobs(lp_list, offsets.get(u.index, 0)) if logprobs else None
                    offsets[u.index] = offsets.get(u.index, 0) + len(text)
                    if text or u.finish_reason:
                        out.append(R.sse(R.text_chunk(rid, created, model, u.index, text, u.finish_reason,
                                                      lps, with_usage)))
                yield b"".join(out)
        except GenerationFailed as e:
            yield R.sse(ApiError(500, str(e), "generation_failed").body())
            return
        finally:
            gen.cancel()
        if with_usage:
            yield R.sse(R.usage_chunk(rid, created, model, "text_completion",
                                      R.usage(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens)))
        yield R.DONE


def build_app(config: ServeConfig) -> Application:
    """The application for `serve.run` / `serve run serve_app.app:build_app` (a dict is validated)."""
    if not isinstance(config, ServeConfig):
        config = ServeConfig.model_validate(config)
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 5,
    }
    if config.autoscaling is not None:
        a = config.autoscaling
        options["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "target_ongoing_requests": a.target_ongoing_requests}
    else:
        options["num_replicas"] = config.num_replicas
    return ChatServer.options(**options).bind(config)


def deploy(config: ServeConfig) -> str:
    """Start Serve (proxy on config.host:port, unless Serve already runs) and deploy the app without
    blocking; returns the app's base URL as clients on this machine reach it."""
    serve.start(http_options={"host": config.host, "port": config.port})
    from ray.serve.context import _get_global_client  # the running proxy's real options

    http = _get_global_client().http_config
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{host}:{http.port}{config.route_prefix.rstrip('/')}"
