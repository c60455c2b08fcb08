"""Unit tests of structured outputs, function calling and top log-probs without Ray or HTTP: the
engine's per-row constraint hook, the llguidance adapter, tool-call text streaming, and how
OpenAI tool messages are rendered into nanochat's conversation.

Run: PYTHONPATH=. python -m pytest tests/test_structured_units.py -q  (20 to 60 s on 2 shared cores)
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.sampling import SamplingParams, apply_bitmask
from nanochat.tokenizer import Tokenizer
from serve_app.grammar import GrammarCompiler, GrammarError, render_tool_call
from serve_app.responses import chat_response
from serve_app.schemas import ApiError, ChatCompletionRequest, parse_request
from serve_app.testing import synthetic_texts
from serve_app.textstream import ChoiceText, ToolTokens
from tests.helpers import tiny_gpt

VOCAB = 512


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic_tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(synthetic_texts(200), VOCAB)


@pytest.fixture(scope="module")
def model() -> GPT:
    config = GPTConfig(sequence_len=256, vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    return tiny_gpt(config, lm_head_std=0.25).eval()  # varied logits (init zeroes lm_head)


def stop_ids(tok: Tokenizer) -> tuple[int, int]:
    return tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()


class EvenTokens:
    """A TokenConstraint allowing even ids only; records what it was told."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def fill_bitmask(self, words: torch.Tensor) -> None:
        words.fill_(0x55555555)  # bits 0, 2, 4, ... of every word

    def accept(self, token: int) -> None:
        self.accepted.append(token)


def test_apply_bitmask_masks_exactly_the_zero_bits() -> None:
    logits = torch.randn(2, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5
    bitmask[1, 2] = 1 << 3  # token 67
    out = apply_bitmask(logits, bitmask)
    assert torch.isfinite(out).sum().item() == 2
    assert out[0, 5] == logits[0, 5] and out[1, 67] == logits[1, 67]


def test_constrained_and_free_rows_share_a_step_and_free_rows_are_unchanged(model) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3, logprobs=True, top_logprobs=4)
    alone = Engine(model, max_batch_size=4).generate([[1, 2, 3]], params)[0]
    engine = Engine(model, max_batch_size=4)
    even = EvenTokens()
    free = engine.add_request([1, 2, 3], params)
    constrained = engine.add_group([7, 8], params, [even])[0]
    tokens: dict[int, list[int]] = {free: [], constrained: []}
    steps = []
    while engine.has_unfinished():
        outs = engine.step()
        steps.append({o.slot for o in outs})
        for o in outs:
            tokens[o.slot].append(o.token)
            assert len(o.top_logprobs) == 4 and o.top_logprobs[0][1] >= o.top_logprobs[-1][1]
    assert tokens[free] == alone.tokens  # a neighbour's mask never changes a free row
    assert all(t % 2 == 0 for t in tokens[constrained]) and even.accepted == tokens[constrained]
    assert sum(1 for s in steps if s == {free, constrained}) >= 11  # one decode step for both rows


def test_engine_rejects_a_wrong_number_of_constraints(model) -> None:
    with pytest.raises(ValueError, match="one per sample"):
        Engine(model, max_batch_size=4).add_group([1], SamplingParams(n=2), [EvenTokens()])


def test_schema_grammar_greedy_equals_reference_and_validates(synthetic_tok, model) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 50},
                                               "tag": {"enum": ["a", "bb"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    compiler = GrammarCompiler(synthetic_tok, stop_ids(synthetic_tok))
    grammar = compiler.json_schema(schema)
    prompt = synthetic_tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    params = SamplingParams(temperature=0, max_new_tokens=64, stop_token_ids=stop_ids(synthetic_tok))
    engine = Engine(model, max_batch_size=2)
    slot = engine.add_group(prompt, params, [grammar.constraint()])[0]
    while engine.has_unfinished():
        engine.step()
    got = engine.result(slot)
    # reference: the grammar's mask over the model's raw logits, argmax per step, no cache
    ref, ids, c = [], list(prompt), grammar.constraint()
    words = torch.zeros((VOCAB + 31) // 32, dtype=torch.int32)
    with torch.no_grad():
        for _ in range(64):
            c.fill_bitmask(words)
            t = int(apply_bitmask(model(torch.tensor([ids]))[0, -1:], words[None]).argmax())
            ref.append(t)
            if t in stop_ids(synthetic_tok):
                break
            c.accept(t)
            ids.append(t)
    assert got.tokens == ref and got.finish_reason == "stop"
    jsonschema.validate(json.loads(synthetic_tok.decode(ref[:-1])), schema)


def test_unenforceable_schemas_are_named(synthetic_tok) -> None:
    compiler = GrammarCompiler(synthetic_tok, stop_ids(synthetic_tok))
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.json_schema({"type": "array", "uniqueItems": True})
    with pytest.raises(GrammarError, match="not a valid JSON Schema"):
        compiler.json_schema({"type": "banana"})
    with pytest.raises(GrammarError, match="look-around"):
        compiler.tool_calls([{"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "string", "pattern": "a(?=b)"}}}}], "required", False)


def test_tool_call_pieces_stream_name_then_arguments(synthetic_tok) -> None:
    sp = {n: synthetic_tok.encode_special(n) for n in ("<|python_start|>", "<|python_end|>",
                                                        "<|output_start|>", "<|output_end|>")}
    tools = ToolTokens(*sp.values())
    token_bytes = [b for b, _ in synthetic_tok.core.get_mergeable_ranks()] + [b""] * 9
    ct = ChoiceText(token_bytes, tools, frozenset(), tool_calls=True)
    call = render_tool_call("get_weather", {"city": "Oslo", "days": 3})
    pieces = ct.push(sp["<|python_start|>"])
    for t in synthetic_tok.encode(call):
        pieces += ct.push(t)
    pieces += ct.push(sp["<|python_end|>"]) + ct.finish()
    assert pieces[0].name == "get_weather" and pieces[0].call_id.startswith("call_") and pieces[0].text == ""
    assert all(p.kind == "tool_call" and p.call == 0 for p in pieces)
    assert "".join(p.text for p in pieces) == '{"city":"Oslo","days":3}'
    message = chat_response("id", 0, "m", [(pieces, "tool_calls")], {}, False)["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo","days":3}'}


def test_tool_messages_render_into_one_assistant_turn(synthetic_tok) -> None:
    from serve_app.conversation import TOOLS_PREAMBLE, to_conversation

    body = {"model": "m", "tools": [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}], "messages": [
        {"role": "user", "content": "add 2"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"}]}
    req = parse_request(ChatCompletionRequest, json.dumps(body).encode())
    conv = to_conversation(req.messages, req.tools)
    assert conv[0]["role"] == "system" and conv[0]["content"].startswith(TOOLS_PREAMBLE)
    call = '{"name":"add","arguments":{"a":2}}'
    assert conv[2] == {"role": "assistant", "content": [{"type": "python", "text": call},
                                                         {"type": "python_output", "text": "4"}]}
    ids = synthetic_tok.render_for_completion({"messages": conv}, continue_last=True)
    sp = synthetic_tok.encode_special
    tail = [sp("<|assistant_start|>"), sp("<|python_start|>"), *synthetic_tok.encode(call),
            sp("<|python_end|>"), sp("<|output_start|>"), *synthetic_tok.encode("4"), sp("<|output_end|>")]
    assert ids[-len(tail):] == tail  # the turn stays open: the model answers after the tool output
    bad = {**body, "messages": [*body["messages"][:2], {"role": "tool", "tool_call_id": "nope", "content": "4"}]}
    with pytest.raises(ApiError, match="answers no earlier assistant tool call"):
        to_conversation(parse_request(ChatCompletionRequest, json.dumps(bad).encode()).messages, None)


@pytest.mark.parametrize("body, problem", [
    ({"top_logprobs": 21, "logprobs": True}, "less than or equal to 20"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "name"),
])
def test_agent_fields_are_validated(body, problem) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(ApiError, match=problem):
        parse_request(ChatCompletionRequest, json.dumps(full).encode())
