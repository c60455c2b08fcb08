"""ServeConfig: everything the chat service needs to know, validated by pydantic.

`build_app(ServeConfig)` in serve_app/app.py is the `import_path` target; `jobs/serve.py` fills
the config from `--run/--stage`, the preset's `serve:` section and `--set key=value` overrides.
Every model listed is served under its `name` (the `model` field of a request picks it); each
replica loads a model on its first request (Serve model multiplexing), at most
`max_models_per_replica` at a time.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One served checkpoint."""

    name: str = Field(description="id clients put in `model`, e.g. nanochat-sft (letters, digits, . _ -)")
    model_uri: str = Field(description="exported model directory ({run}/<stage>/model): local path, s3:// or gs://")
    tokenizer_uri: str | None = Field(
        default=None, description="tokenizer directory; None = the model directory's tokenizer/ subdirectory")
    kind: Literal["chat", "base"] = Field(
        default="chat",
        description="chat: /v1/chat/completions with the chat format; base: /v1/completions only")
    tool_use: bool = Field(
        default=True, description="run the model's <|python_start|> blocks in the sandbox (chat models only)")

    @model_validator(mode="after")
    def _check_name(self) -> ModelSpec:
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return self


class Limits(_Strict):
    """Request limits: anything above them is refused with a 4xx and an OpenAI error body."""

    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="request body size (413 above)")
    max_messages: int = Field(default=256, ge=1, description="messages per chat request")
    max_chars: int = Field(default=100_000, ge=1, description="characters over all messages or prompts")
    max_prompts: int = Field(default=16, ge=1, description="prompts per /v1/completions request")
    max_n: int = Field(default=8, ge=1, description="choices per prompt (also capped by max_batch_size)")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens when a request gives none")


class Autoscaling(_Strict):
    """Serve autoscaling of replicas by ongoing requests."""

    min_replicas: int = Field(default=1, ge=0, description="fewest replicas (0 = scale to zero)")
    max_replicas: int = Field(default=2, ge=1, description="most replicas")
    target_ongoing_requests: float = Field(default=16, gt=0,
                                           description="ongoing requests per replica to aim at")


class ServeConfig(_Strict):
    """The whole service: models, placement, batching, limits, auth."""

    models: list[ModelSpec] = Field(min_length=1, description="checkpoints to serve (unique names)")
    app_name: str = Field(default="nanochat", description="Serve application name")
    route_prefix: str = Field(default="/", description="HTTP route prefix of the application")
    host: str = Field(default="127.0.0.1", description="address the Serve HTTP proxy binds (0.0.0.0 = all)")
    port: int = Field(default=8000, ge=1, le=65535, description="port of the Serve HTTP proxy")
    api_keys: list[str] = Field(
        default_factory=list, description="accepted Bearer keys; empty = no authentication")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="where replicas run the model")
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="weights and KV cache dtype")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs each replica reserves")
    num_gpus: float = Field(default=0.0, ge=0,
                            description="GPUs each replica reserves (device cuda needs > 0)")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per replica; None = max(1, num_cpus)")
    num_replicas: int = Field(default=1, ge=1, description="replicas when autoscaling is off")
    autoscaling: Autoscaling | None = Field(default=None, description="autoscaling instead of num_replicas")
    max_ongoing_requests: int = Field(default=64, ge=1, description="requests a replica runs at once (Serve)")
    max_queued_requests: int = Field(
        default=128, ge=-1,
        description="requests queued in front of the replicas before Serve answers 503 (-1 = no bound)")
    max_batch_size: int = Field(default=32, ge=1,
                                description="engine slots (sequences decoded together) per model")
    max_seq_len: int | None = Field(
        default=None, ge=16,
        description="context per sequence (prompt + output); None = the model's sequence_len")
    max_prefill_tokens: int = Field(default=4096, ge=16,
                                    description="rows x padded length of one prefill step")
    prefill_chunk_tokens: int = Field(
        default=128, ge=0, description="prompt tokens prefilled per step beside running decodes (0 = whole "
        "prompts, prefill first); see README 'Prefix reuse and chunked prefill' for how the default was "
        "measured")
    prefix_cache_mb: int = Field(
        default=256, ge=0, description="memory for reused prompt prefixes per model (0 = no prefix reuse)")
    prefix_block_size: int = Field(default=16, ge=1, description="tokens per prefix-cache block")
    max_waiting: int = Field(
        default=64, ge=0, description="requests waiting for an engine slot per model before 429")
    max_models_per_replica: int | None = Field(
        default=None, ge=1, description="models loaded at once per replica (LRU); None = all of them")
    step_log_size: int = Field(default=4096, ge=0, description="scheduler steps kept for /debug/steps")
    limits: Limits = Field(default_factory=Limits, description="request limits")

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("device 'cuda' needs num_gpus > 0 (e.g. num_gpus=1)")
        if self.device == "cpu" and self.dtype == "bfloat16":
            raise ValueError("dtype bfloat16 is for device cuda; use float32 on CPU")
        if self.autoscaling and self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= autoscaling.max_replicas")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        return self

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))
