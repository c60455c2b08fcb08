"""A served model inside a replica: checkpoint + tokenizer + Engine + Scheduler, and its text tables.

`ServedModel.load(spec, config)` reads an exported model (`nanochat.checkpoint.load_model`) from a
local path, or first copies it from `s3://`/`gs://` (cluster/artifacts.py); builds the Engine (slots
= `max_batch_size`, optional Python tool through nanochat/sandbox.py) and starts its Scheduler.
`ServedModel.from_objects(...)` does the same for a model and tokenizer already in memory (unit
tests, benchmarks). `close()` (also called by Serve when the multiplexer unloads the model) stops
the scheduler thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanochat.engine import Engine, ToolUse
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from serve_app.config import ModelSpec, ServeConfig
from serve_app.grammar import GrammarCompiler
from serve_app.scheduler import Scheduler
from serve_app.textstream import ToolTokens


def local_dir(uri: str) -> Path:
    """A local directory holding `uri`'s files (copied once per process when it is remote:
    cluster/artifacts.py's localize)."""
    from cluster.artifacts import localize

    path = Path(localize(uri))
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; check model_uri/tokenizer_uri in the serve config")
    return path


@dataclass
class ServedModel:
    """Everything one model needs to answer requests in this replica."""

    spec: ModelSpec
    tokenizer: Tokenizer
    engine: Engine
    scheduler: Scheduler
    token_bytes: list[bytes]  # bytes of every token id (b"" for special tokens)
    tools: ToolTokens
    hidden: frozenset[int]  # special tokens never shown to clients
    stop_ids: tuple[int, ...]  # special tokens that end a sequence
    special_names: dict[int, str] = field(default_factory=dict)  # id -> "<|name|>" (top log-probs)
    _grammars: GrammarCompiler | None = None
    on_close: Callable[[], None] | None = None  # called once when the model is closed or unloaded

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this tokenizer, built on first use (~1 s at a 65k vocabulary)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.stop_ids)
        return self._grammars

    @classmethod
    def load(cls, spec: ModelSpec, config: ServeConfig) -> ServedModel:
        from nanochat.checkpoint import load_model

        device = torch.device(config.device)
        model, meta = load_model(local_dir(spec.model_uri), device)
        tok_dir = local_dir(spec.tokenizer_uri) if spec.tokenizer_uri else meta.get("tokenizer_dir")
        if tok_dir is None:
            raise FileNotFoundError(
                f"model {spec.name}: no tokenizer/ next to the weights in {spec.model_uri}; "
                "set tokenizer_uri")
        if config.dtype == "bfloat16":
            model = model.to(dtype=torch.bfloat16)
        return cls.from_objects(spec, model, Tokenizer.load(tok_dir), config)

    @classmethod
    def from_objects(cls, spec: ModelSpec, model: Any, tokenizer: Tokenizer,
                     config: ServeConfig) -> ServedModel:
        """Engine + scheduler (started) around a model and tokenizer in memory; set
        `scheduler.on_step` for per-step metrics."""
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"model {spec.name}: vocab_size {model.config.vocab_size} differs from the "
                             f"tokenizer's {tokenizer.vocab_size}; serve the tokenizer it was trained with")
        sp = {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
        chat_tools = spec.kind == "chat"
        tools = ToolTokens(sp["<|python_start|>"], sp["<|python_end|>"], sp["<|output_start|>"],
                           sp["<|output_end|>"]) if chat_tools else ToolTokens()
        tool_use = _sandbox_tool(tokenizer, sp) if chat_tools and spec.tool_use else None
        max_seq_len = config.max_seq_len or model.config.sequence_len
        max_seq_len = min(max_seq_len, getattr(model, "rotary_len", max_seq_len))  # rotary tables bound it
        engine = Engine(model, max_batch_size=config.max_batch_size, max_seq_len=max_seq_len,
                        tool_use=tool_use, max_prefill_tokens=config.max_prefill_tokens,
                        prefill_chunk_tokens=config.prefill_chunk_tokens,
                        prefix_cache_bytes=config.prefix_cache_mb << 20,
                        prefix_block_size=config.prefix_block_size)
        scheduler = Scheduler(engine, max_waiting=config.max_waiting, step_log_size=config.step_log_size,
                              name=spec.name)
        token_bytes = [b for b, _ in tokenizer.core.get_mergeable_ranks()] + [b""] * len(SPECIAL_TOKENS)
        shown = {tools.python_start, tools.python_end, tools.output_start, tools.output_end}
        hidden = frozenset(i for i in sp.values() if i not in shown)
        stop_ids = (sp["<|assistant_end|>"], sp["<|bos|>"]) if spec.kind == "chat" else (sp["<|bos|>"],)
        served = cls(spec, tokenizer, engine, scheduler, token_bytes, tools, hidden, stop_ids,
                     {i: name for name, i in sp.items()})
        scheduler.start()
        return served

    def close(self) -> None:
        self.scheduler.close()
        self._closed()

    def __del__(self) -> None:  # Serve's multiplexer calls it when it unloads the model (LRU)
        scheduler = self.__dict__.get("scheduler")
        if scheduler is not None and scheduler.alive:
            scheduler.close()
        self._closed()

    def _closed(self) -> None:
        callback, self.__dict__["on_close"] = self.__dict__.get("on_close"), None
        if callback is not None:
            callback()


def _sandbox_tool(tokenizer: Tokenizer, sp: dict[str, int]) -> ToolUse:
    """The Python tool: the model's code runs in nanochat's sandbox, its output is fed back."""
    from nanochat.sandbox import Sandbox, format_tool_output

    sandbox = Sandbox()
    return ToolUse(
        run=lambda code: format_tool_output(sandbox.run(code)),
        encode=tokenizer.encode, decode=tokenizer.decode,
        python_start=sp["<|python_start|>"], python_end=sp["<|python_end|>"],
        output_start=sp["<|output_start|>"], output_end=sp["<|output_end|>"],
    )

