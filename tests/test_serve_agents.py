"""The chat API as agents use it, driven by the official `openai` client against the deployed service:
structured outputs (`response_format`), function calling (`tools`, `tool_choice`, tool messages in
the history) and top log-probs, on a random 2-layer GPT (vocab 512, context 1024: the tool listing
is long in 512 tokens) on the session's Ray cluster.

- six fixed schemas at temperature 1, max_tokens 256: 100 replies each (10 requests of n=10);
  every "stop" reply parses and validates; bounded schemas end with "stop" at least 95% of the
  time; the unbounded string's share is printed (run with -s to see it);
- temperature 0 equals a reference loop in this process (the grammar's mask over the model's
  raw logits, argmax per step, no KV cache), token for token, for schemas and json_object;
- tool_choice required / named / auto, streamed deltas reassembled equal the whole answer;
- top_logprobs equal a teacher-forced forward pass within 1e-5 (chat and completions).

Run: PYTHONPATH=. python -m pytest tests/test_serve_agents.py -q -s  (6 min on 2 cores shared by 4 engineers)
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import jsonschema
import openai
import pytest
import torch

from cluster.local import free_port
from serve_app.config import ServeConfig
from serve_app.testing import write_random_checkpoint
from tests.helpers import hi

pytestmark = pytest.mark.cluster

CHAT, BASE = "nanochat-sft", "nanochat-base"
ASK = "answer in JSON"  # the user turn of most requests below


def obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SHORT = {"type": "string", "maxLength": 8}
SCHEMAS = {  # name -> (schema, bounded)
    "nested": (obj(user=obj(name=SHORT, age={"type": "integer", "minimum": 0, "maximum": 120}),
                   active={"type": "boolean"}), True),
    "array": (obj(tags={"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3},
                  scores={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                          "maxItems": 4}), True),
    "enum": (obj(color={"enum": ["red", "green", "blue"]}, size={"type": "string", "enum": ["S", "M", "L"]}), True),
    "numeric": (obj(x={"type": "integer", "minimum": -10, "maximum": 10},
                    y={"type": "integer", "exclusiveMinimum": 0, "maximum": 1000}), True),
    "max_length": (obj(code={"type": "string", "minLength": 2, "maxLength": 6},
                       note={"type": "string", "maxLength": 16}), True),
    "unbounded_string": (obj(text={"type": "string"}), False),
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": obj(city=SHORT, days={"type": "integer", "minimum": 1,
                                                                                "maximum": 7})}}
CONVERT = {"type": "function", "function": {"name": "convert", "parameters": obj(
    unit={"enum": ["C", "F"]}, value={"type": "integer", "minimum": -50, "maximum": 50})}}
TOOLS = [WEATHER, CONVERT]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("agents") / "model", vocab_size=512, sequence_len=1024)


@pytest.fixture(scope="module")
def agent_client(ray_cluster, ckpt):
    from ray import serve

    from serve_app.app import deploy

    config = ServeConfig(
        models=[{"name": CHAT, "model_uri": str(ckpt), "tool_use": False},
                {"name": BASE, "model_uri": str(ckpt), "kind": "base"}],
        port=free_port(), num_cpus=1, torch_threads=1, max_batch_size=20, max_waiting=64,
        limits={"max_n": 10},
    )
    url = deploy(config)
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    for model in (CHAT, BASE):
        c.completions.create(model=model, prompt="warm", max_tokens=2)
    try:
        yield c
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def local(ckpt):
    """The same model and tokenizer in this process, for the reference loops."""
    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import Tokenizer

    model, _ = load_model(ckpt, torch.device("cpu"))
    tok = Tokenizer.load(ckpt / "tokenizer")
    return model.eval(), tok


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name][0], "strict": True}}


def many(client, n_requests: int, **kw) -> list:
    """n_requests chat requests of n=10 choices (seeds 0..), two in flight; all their choices."""
    with cf.ThreadPoolExecutor(2) as pool:
        replies = pool.map(lambda s: client.chat.completions.create(model=CHAT, n=10, seed=s, **kw),
                           range(n_requests))
        return [c for r in replies for c in r.choices]


# ---- structured outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_schema_replies_validate(agent_client, name) -> None:
    schema, bounded = SCHEMAS[name]
    choices = many(agent_client, 10, messages=hi(ASK), temperature=1.0, max_tokens=256,
                   response_format=schema_format(name))
    assert len(choices) == 100
    finishes = [c.finish_reason for c in choices]
    assert set(finishes) <= {"stop", "length"}
    for c in choices:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), schema)
    share = finishes.count("stop") / len(finishes)
    print(f"\n[structured] {name}: {finishes.count('stop')}/100 stop, {finishes.count('length')}/100 length")
    if bounded:
        assert share >= 0.95


def test_json_object_replies_parse(agent_client) -> None:
    choices = many(agent_client, 10, messages=hi(ASK), temperature=1.0, max_tokens=256,
                   response_format={"type": "json_object"})
    stops = [c for c in choices if c.finish_reason == "stop"]
    print(f"\n[structured] json_object: {len(stops)}/100 stop")
    assert len(choices) == 100 and stops
    assert all(isinstance(json.loads(c.message.content), dict) for c in stops)


def reference_greedy(local, messages: list[dict], grammar, max_tokens: int) -> tuple[list[int], str]:
    """The grammar's mask over the model's raw logits, argmax per step, full forward each step."""
    from nanochat.sampling import apply_bitmask

    model, tok = local
    stops = (tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id())
    ids = tok.render_for_completion({"messages": messages})
    c, out = grammar.constraint(), []
    words = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    with torch.no_grad():
        for _ in range(max_tokens):
            words.zero_()
            c.fill_bitmask(words)
            t = int(apply_bitmask(model(torch.tensor([ids + out]))[0, -1:], words[None]).argmax())
            if t in stops:
                return out, "stop"
            c.accept(t)
            out.append(t)
    return out, "length"


@pytest.mark.parametrize("fmt", ["nested", "array", "unbounded_string", "json_object"])
def test_greedy_equals_reference_loop(agent_client, local, fmt) -> None:
    from serve_app.grammar import GrammarCompiler

    _, tok = local
    compiler = GrammarCompiler(tok, (tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()))
    grammar = compiler.json_object() if fmt == "json_object" else compiler.json_schema(SCHEMAS[fmt][0])
    response_format = {"type": "json_object"} if fmt == "json_object" else schema_format(fmt)
    for text in ("answer in JSON", "Ka lo mi ne ru"):
        reply = agent_client.chat.completions.create(model=CHAT, messages=hi(text), temperature=0,
                                                     max_tokens=96, response_format=response_format, logprobs=True)
        ref, finish = reference_greedy(local, hi(text), grammar, 96)
        choice = reply.choices[0]
        assert [bytes(e.bytes) for e in choice.logprobs.content] == [tok.core.id_to_bytes(t) for t in ref]
        assert choice.message.content == tok.decode(ref) and choice.finish_reason == finish


def test_constrained_streaming_equals_whole(agent_client) -> None:
    kw = dict(model=CHAT, messages=hi(ASK), temperature=1.0, max_tokens=128, seed=3,
              response_format=schema_format("nested"))
    whole = agent_client.chat.completions.create(**kw).choices[0]
    chunks = list(agent_client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content and chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_unenforceable_schema_is_a_400_naming_it(agent_client) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        agent_client.chat.completions.create(model=CHAT, messages=hi(ASK), response_format=bad)
    with pytest.raises(openai.BadRequestError, match="not a valid JSON Schema"):
        agent_client.chat.completions.create(model=CHAT, messages=hi(ASK), response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 5}}})


# ---- function calling --------------------------------------------------------------------------


def check_calls(choice, names: set[str]) -> None:
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_choice_required_gives_valid_calls(agent_client) -> None:
    choices = many(agent_client, 10, messages=hi("weather in Oslo?"), tools=TOOLS, tool_choice="required",
                   parallel_tool_calls=False, temperature=1.0, max_tokens=256)
    assert len(choices) == 100
    for c in choices:
        check_calls(c, set(PARAMS))
        assert len(c.message.tool_calls) == 1


def test_named_tool_choice_and_parallel_calls(agent_client) -> None:
    named = {"type": "function", "function": {"name": "convert"}}
    for c in many(agent_client, 2, messages=hi(ASK), tools=TOOLS, tool_choice=named,
                  parallel_tool_calls=False, max_tokens=256):
        check_calls(c, {"convert"})
    parallel = many(agent_client, 2, messages=hi(ASK), tools=TOOLS, tool_choice="required", max_tokens=256)
    for c in parallel:
        if c.finish_reason == "tool_calls":
            check_calls(c, set(PARAMS))
        else:  # a random model may keep calling until max_tokens: reported as "length"
            assert c.finish_reason == "length"
    assert any(c.finish_reason == "tool_calls" for c in parallel)


def test_auto_tool_choice_answers_text_or_calls(agent_client) -> None:
    for c in many(agent_client, 2, messages=hi(ASK), tools=TOOLS, max_tokens=64):
        if c.message.tool_calls and c.finish_reason == "tool_calls":
            check_calls(c, set(PARAMS))
        else:
            assert c.finish_reason in ("stop", "length")


def test_streamed_tool_call_deltas_rebuild_the_whole_answer(agent_client) -> None:
    kw = dict(model=CHAT, messages=hi(ASK), tools=TOOLS, tool_choice="required", seed=5, max_tokens=256,
              temperature=1.0)
    whole = agent_client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in agent_client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            if d.id is not None:  # the first delta of a call: id, type and name, empty arguments
                assert d.type == "function" and d.function.name and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_tool_results_in_the_history(agent_client, local) -> None:
    _, tok = local
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Oslo", "days": 2})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    from serve_app.conversation import to_conversation
    from serve_app.schemas import ChatCompletionRequest, parse_request

    for stream in (False, True):
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        reply = agent_client.chat.completions.create(model=CHAT, messages=messages, tools=TOOLS, max_tokens=16, **extra)
        usage = list(reply)[-1].usage if stream else reply.usage
        req = parse_request(ChatCompletionRequest, json.dumps({"model": CHAT, "messages": messages,
                                                              "tools": TOOLS}).encode())
        expected = tok.render_for_completion({"messages": to_conversation(req.messages, req.tools)}, continue_last=True)
        assert usage.prompt_tokens == len(expected)
        assert expected[-1] == tok.encode_special("<|output_end|>")
    bad = [*messages[:2], {"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="answers no earlier assistant tool call"):
        agent_client.chat.completions.create(model=CHAT, messages=bad, tools=TOOLS)


# ---- log-probs ---------------------------------------------------------------------------------


def teacher_forced(local, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    model, _ = local
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1: -1]  # (T, V): predicts tokens
    return torch.log_softmax(logits.float(), -1)


def check_top(logp_row: torch.Tensor, tok, top: dict[bytes, float], chosen: bytes, chosen_lp: float, k: int) -> None:
    values, ids = logp_row.topk(k)
    want = {tok.id_to_token(int(i)).encode() if int(i) >= tok.core.vocab_size else tok.core.id_to_bytes(int(i)):
            float(v) for i, v in zip(ids, values, strict=True)}  # special tokens are shown by name
    assert len(top) == k and set(top) == set(want)
    assert all(abs(top[b] - want[b]) < 1e-5 for b in want)
    if chosen in want:
        assert abs(top[chosen] - chosen_lp) < 1e-6


def test_chat_top_logprobs_equal_a_teacher_forced_pass(agent_client, local) -> None:
    _, tok = local
    by_bytes = {tok.core.id_to_bytes(i): i for i in range(tok.vocab_size - 9)}
    prompt = tok.render_for_completion({"messages": hi("Mi ka lo")})
    seed = next(s for s in range(20) if len(agent_client.chat.completions.create(  # a reply of text tokens
        model=CHAT, messages=hi("Mi ka lo"), max_tokens=20, seed=s, logprobs=True,
        extra_body={"ignore_eos": True}).choices[0].logprobs.content) == 20)
    for stream in (False, True):
        kw = dict(model=CHAT, messages=hi("Mi ka lo"), max_tokens=20, seed=seed, logprobs=True, top_logprobs=5,
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = agent_client.chat.completions.create(stream=True, **kw)
            entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        else:
            entries = agent_client.chat.completions.create(**kw).choices[0].logprobs.content
        assert len(entries) == 20
        tokens = [by_bytes[bytes(e.bytes)] for e in entries]
        logp = teacher_forced(local, prompt, tokens)
        for j, e in enumerate(entries):
            assert abs(e.logprob - float(logp[j, tokens[j]])) < 1e-5
            check_top(logp[j], tok, {bytes(t.bytes): t.logprob for t in e.top_logprobs}, bytes(e.bytes), e.logprob, 5)


def test_completion_top_logprobs_equal_a_teacher_forced_pass(agent_client, local) -> None:
    _, tok = local

    def text(i: int) -> str:
        return tok.id_to_token(i)  # special tokens by name

    def clean_prefix(tokens: list[str]) -> int:  # tokens before the first cut character
        return next((j for j, t in enumerate(tokens) if "\ufffd" in t), len(tokens))

    # legacy log-probs name tokens by text: the longest run of tokens without a cut character
    # (half of the random model's 512 ids are raw bytes, most of them half a character)
    replies = [agent_client.completions.create(model=BASE, prompt="Ka lo mi", max_tokens=16, seed=seed,
                                               logprobs=3, extra_body={"ignore_eos": True}).choices[0].logprobs
               for seed in range(8)]
    lp = max((r for r in replies if len(r.tokens) == 16), key=lambda r: clean_prefix(r.tokens))  # no hidden token
    by_text = {text(i): i for i in range(tok.vocab_size - 9)}
    prompt = tok.encode("Ka lo mi", prepend="<|bos|>")
    k = clean_prefix(lp.tokens)
    assert k >= 4
    tokens = [by_text[t] for t in lp.tokens[:k]]
    logp = teacher_forced(local, prompt, tokens)
    for j, (t, top) in enumerate(zip(lp.tokens[:k], lp.top_logprobs[:k], strict=True)):
        assert abs(lp.token_logprobs[j] - float(logp[j, tokens[j]])) < 1e-5
        values, ids = logp[j].topk(3)
        for i, v in zip(ids.tolist(), values.tolist(), strict=True):
            if "\ufffd" not in text(i):
                assert abs(top[text(i)] - v) < 1e-5
        assert t in top and top[t] == lp.token_logprobs[j]  # the chosen token is always reported
