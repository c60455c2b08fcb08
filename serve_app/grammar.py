"""Grammar-constrained decoding for the service: JSON schemas and tool calls as llguidance matchers.

    compiler = GrammarCompiler(tokenizer, stop_ids)          # once per served model
    grammar = compiler.json_schema(schema)                    # GrammarError (-> 400) names what fails
    engine.add_group(prompt, params, [grammar.constraint() for _ in range(params.n)])

Notable:
- library: llguidance (Rust, `pip install llguidance`, no other dependency). Its token masks are
  computed by walking a trie of the vocabulary's bytes with an Earley parser over a lexer, so the
  cost per token stays small even at a 65k vocabulary; benchmarks/structured_outputs.py measures it
  against outlines-core and xgrammar on our tokenizer (figures in the README). It reads our
  byte-level BPE straight from the tiktoken view of the tokenizer (`Tokenizer.to_tiktoken()`),
  special tokens included, so a grammar can name `<|python_start|>`.
- schema features llguidance cannot enforce (e.g. `uniqueItems`, look-around in a `pattern`) are
  errors, never silently ignored: `GrammarError` carries the library's message naming them. The
  schema itself is checked first with `jsonschema` (its draft's meta-schema).
- JSON is compact: no free whitespace (`whitespace_flexible: false`), so a reply's length is
  bounded by its schema, not by how long a random model keeps emitting spaces.
- end of a reply: the served model's stop tokens are the matcher's end-of-sequence tokens; the
  mask allows them exactly when the grammar accepts, so a reply that ends with "stop" is complete.
- tool calls: a call is a python block holding `{"name":...,"arguments":{...}}` (the mapping is in
  `render_tool_call`); `tool_calls` builds a Lark grammar around one `%json` schema that is an
  `anyOf` over the functions (`name` a const, `arguments` the function's parameters).
- `GrammarConstraint` implements nanochat.engine.TokenConstraint: the engine asks it for a
  bitmask row before sampling and tells it the chosen token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jsonschema
import llguidance
import torch

from nanochat.errors import NanochatError
from nanochat.tokenizer import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: see the module docstring


class GrammarError(NanochatError, ValueError):
    """A schema or tool definition the service cannot enforce; the message names the problem."""


class GrammarConstraint:
    """One row's matcher (nanochat.engine.TokenConstraint)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.error: str | None = self.matcher.get_error() or None

    def fill_bitmask(self, words: torch.Tensor) -> None:
        if words.dtype != torch.int32 or not words.is_contiguous() or words.device.type != "cpu":
            raise ValueError("fill_bitmask needs a contiguous CPU int32 tensor")
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token) and self.error is None:
            self.error = self.matcher.get_error()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


class Grammar:
    """A validated, compiled grammar; `constraint()` gives a fresh matcher for one row (a copy of
    the compiled one: compiling costs milliseconds, copying microseconds)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.text = grammar
        self._prototype = llguidance.LLMatcher(tokenizer, grammar, log_level=0)

    def constraint(self) -> GrammarConstraint:
        return GrammarConstraint(self._prototype.deep_copy())


class GrammarCompiler:
    """Compiles response formats and tool definitions for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int]) -> None:
        enc = tokenizer.to_tiktoken()
        self.tokenizer = llguidance.LLTokenizer.from_tiktoken(
            encoder=enc._mergeable_ranks, special_tokens=enc._special_tokens, pattern=enc._pat_str,
            eos_token=list(stop_ids), n_vocab=tokenizer.vocab_size)

    def json_schema(self, schema: dict, where: str = "response_format.json_schema.schema") -> Grammar:
        check_schema(schema, where)
        return self._compile(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS),
                             where)

    def json_object(self) -> Grammar:
        return self.json_schema({"type": "object"}, "response_format")

    def tool_calls(self, functions: Sequence[dict], mode: str, parallel: bool) -> Grammar:
        """functions: [{"name", "parameters"}]; mode: "auto" (text or calls), "required" (calls
        only; a named tool_choice passes just that function)."""
        variants = []
        for f in functions:
            params = f.get("parameters") or {"type": "object", "properties": {},
                                             "additionalProperties": False}
            check_schema(params, f"tools[{f['name']}].function.parameters")
            variants.append({"type": "object",
                             "properties": {"name": {"const": f["name"]}, "arguments": params},
                             "required": ["name", "arguments"], "additionalProperties": False})
        call = json.dumps({"anyOf": variants, "x-guidance": JSON_OPTIONS})
        many = "*" if parallel else "?"
        if mode == "auto":
            start = f"start: TEXT? call{many}\nTEXT: /(.|\\n)+/\n"
        elif mode == "required":
            start = f"start: call{'+' if parallel else ''}\n"
        else:
            raise ValueError(f"tool grammar mode must be 'auto' or 'required', got {mode!r}")
        lark = f"{start}call: <|python_start|> %json {call} <|python_end|>\n"
        return self._compile(llguidance.LLMatcher.grammar_from_lark(lark), "tools")

    def _compile(self, grammar: str, where: str) -> Grammar:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(f"{where}: cannot be enforced: {messages[0].strip()}")
        return Grammar(self.tokenizer, grammar)


def check_schema(schema: Any, where: str) -> None:
    """A JSON Schema valid under its draft's meta-schema, else GrammarError naming the problem."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{where}: a JSON Schema must be an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise GrammarError(f"{where}: not a valid JSON Schema at {path}: {e.message}") from None


def render_tool_call(name: str, arguments: Any) -> str:
    """The text of one call inside its python block, exactly as the grammar makes the model write it."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))
