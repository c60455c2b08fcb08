"""Unit tests of the serving core without Ray or HTTP: text streaming (stop strings, UTF-8, tool
parts, log-probs), request schemas, and the continuous-batching Scheduler on a tiny GPT.

Run: PYTHONPATH=. python -m pytest tests/test_serve_units.py -q
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from serve_app.scheduler import Overloaded, Scheduler
from serve_app.schemas import ApiError, ChatCompletionRequest, parse_request
from serve_app.textstream import ChoiceText, ToolTokens, merge_pieces
from tests.helpers import wait_for

PY_START, PY_END, OUT_START, OUT_END, END = range(256, 261)
TOKEN_BYTES = [bytes([i]) for i in range(256)] + [b""] * 5
TOOLS = ToolTokens(PY_START, PY_END, OUT_START, OUT_END)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def feed(ct: ChoiceText, data: bytes | list[int], logprob: float | None = None) -> list:
    pieces = []
    for t in data:
        pieces += ct.push(t, logprob)
    return pieces


def text_of(pieces: list) -> str:
    return "".join(p.text for p in pieces if p.kind == "text")


# ---- ChoiceText --------------------------------------------------------------------------------


def test_stop_string_spanning_tokens_is_never_released() -> None:
    ct = ChoiceText(TOKEN_BYTES, TOOLS, frozenset({END}), stop=["STOP"])
    released = []
    for t in b"hello ST":
        released.append(text_of(ct.push(t)))
    assert "".join(released) == "hello "  # "ST" is held: it may begin "STOP"
    assert not ct.stopped
    assert text_of(feed(ct, b"OP and more")) == ""
    assert ct.stopped and ct.finish() == []


def test_false_stop_prefix_is_released_later_and_at_finish() -> None:
    ct = ChoiceText(TOKEN_BYTES, TOOLS, frozenset(), stop=["STOP", "xyz"])
    assert text_of(feed(ct, b"a ST")) == "a "
    assert text_of(feed(ct, b"AY")) == "STAY"  # the held "ST" turned out not to be a stop
    assert text_of(feed(ct, b" x")) == " "
    assert text_of(ct.finish()) == "x"  # end of the choice: nothing can follow any more
    assert not ct.stopped


def test_earliest_stop_wins_and_text_before_it_is_kept() -> None:
    ct = ChoiceText(TOKEN_BYTES, TOOLS, frozenset(), stop=["cd", "bcde"])
    assert text_of(feed(ct, b"abcdef")) == "ab"
    assert ct.stopped


def test_utf8_character_split_over_tokens() -> None:
    ct = ChoiceText(TOKEN_BYTES, TOOLS, frozenset())
    data = "é→😀".encode()
    out = [text_of(ct.push(t)) for t in data]
    assert "".join(out) == "é→😀"
    assert all(len(o) <= 1 for o in out)  # characters only appear once complete
    cut = ChoiceText(TOKEN_BYTES, TOOLS, frozenset())
    assert text_of(feed(cut, "😀".encode()[:2])) == ""
    assert text_of(cut.finish()) == "\ufffd"


def test_tool_parts_and_hidden_tokens() -> None:
    ct = ChoiceText(TOKEN_BYTES, TOOLS, frozenset({END}), stop=["zz"])
    pieces = feed(ct, [*b"Let me z", PY_START, *b"1+1", PY_END, OUT_START, *b"2", OUT_END, *b"So 2", END])
    pieces += ct.finish()
    merged = merge_pieces(pieces)
    assert [(p.kind, p.text) for p in merged] == [
        ("text", "Let me z"), ("python", "1+1"), ("python_output", "2"), ("text", "So 2")]


def test_logprobs_follow_released_text_and_stop_drops_the_rest() -> None:
    ct = ChoiceText(TOKEN_BYTES, TOOLS, frozenset(), stop=["cd"], logprobs=True)
    pieces = feed(ct, b"abcd", logprob=-1.5)
    lps = [lp for p in pieces for lp in p.logprobs]
    assert text_of(pieces) == "ab"
    assert [lp.token for lp in lps] == ["a", "b"] and lps[0].logprob == -1.5 and lps[0].bytes == [97]


# ---- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', "invalid_request"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', "invalid_request"),
    (b'{"model": "m", "messages": [], "max_tokens": 5}', "invalid_request"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}', "invalid_request"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_encoding"),
])
def test_bad_requests_are_400_with_a_reason(body: bytes, code: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_request(ChatCompletionRequest, body)
    assert e.value.status == 400 and e.value.code == code
    assert e.value.body()["error"]["message"]


def test_good_request_parses_with_extensions() -> None:
    req = parse_request(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}],'
                                               b' "top_k": 5, "stop": ["a", "b"], "max_completion_tokens": 7}')
    assert req.top_k == 5 and req.stop_list() == ["a", "b"] and req.token_budget == 7


# ---- Scheduler on a tiny GPT -------------------------------------------------------------------


def tiny_engine(slots: int = 4) -> Engine:
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return Engine(model.eval(), max_batch_size=slots, max_seq_len=128)


async def drain(sub, want_choices: int) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    done = 0
    while done < want_choices:
        _, events = await asyncio.wait_for(sub.queue.get(), timeout=30)
        assert not isinstance(events, BaseException), events
        for ev in events:
            tokens.setdefault(ev.choice, []).append(ev.token)
            done += ev.finished
    return tokens


def test_scheduler_batches_a_late_request_into_running_decodes() -> None:
    engine = tiny_engine()
    reference = Engine(engine.model, max_batch_size=4, max_seq_len=128)
    long_p = SamplingParams(max_new_tokens=60, temperature=1.0, seed=1)
    short_p = SamplingParams(max_new_tokens=5, temperature=1.0, seed=2)
    scheduler = Scheduler(engine, max_waiting=4)

    async def main():
        scheduler.start()
        long_sub = scheduler.submit("long", [1, 2, 3], long_p)
        first = await long_sub.queue.get()  # the long request is decoding now
        short_sub = scheduler.submit("short", [4, 5], short_p)
        short = await drain(short_sub, 1)
        rest = await drain(long_sub, 1)
        return [ev.token for ev in first[1]] + rest[0], short[0]

    try:
        long_tokens, short_tokens = asyncio.run(main())
    finally:
        scheduler.close()
    # batching does not change what a seeded request generates
    assert long_tokens == reference.generate([[1, 2, 3]], long_p)[0].tokens
    assert short_tokens == reference.generate([[4, 5]], short_p)[0].tokens
    shared = [r for r in scheduler.step_log() if r.kind == "decode" and {"long/0", "short/0"} <= set(r.rows)]
    assert len(shared) >= 3  # the short request's decode steps also decoded the long one
    assert engine.free_slots() == [0, 1, 2, 3]  # finished requests freed their slots


def test_scheduler_cancel_frees_slots_and_n_choices_share_a_prompt() -> None:
    engine = tiny_engine(slots=3)
    scheduler = Scheduler(engine, max_waiting=1)

    async def main():
        scheduler.start()
        big = scheduler.submit("big", [7, 8, 9], SamplingParams(max_new_tokens=100, n=3, seed=0))
        await big.queue.get()
        queued = scheduler.submit("queued", [1], SamplingParams(max_new_tokens=3))  # waits: no free slot
        with pytest.raises(Overloaded):
            scheduler.submit("refused", [1], SamplingParams(max_new_tokens=3))
        scheduler.cancel(big)  # frees all three slots, so "queued" is admitted
        return await drain(queued, 1)

    try:
        tokens = asyncio.run(main())
    finally:
        scheduler.close()
    assert len(tokens[0]) == 3
    assert engine.free_slots() == [0, 1, 2]
    assert any(r.rows == ("big/0", "big/1", "big/2") for r in scheduler.step_log())  # n=3: one prefill, 3 rows


def test_requests_arriving_together_are_prefilled_in_one_step() -> None:
    engine = tiny_engine()
    scheduler = Scheduler(engine, max_waiting=8)

    async def main():
        subs = [scheduler.submit(f"r{i}", [1 + i] * (3 + i), SamplingParams(max_new_tokens=4)) for i in range(3)]
        scheduler.start()  # all three wait already: one padded prefill takes them together
        for sub in subs:
            await drain(sub, 1)

    try:
        asyncio.run(main())
    finally:
        scheduler.close()
    first = scheduler.step_log()[0]
    assert first.kind == "prefill" and set(first.rows) == {"r0/0", "r1/0", "r2/0"}
    assert all(r.kind == "decode" for r in scheduler.step_log()[1:])


def test_generation_over_a_served_model_without_ray() -> None:
    from nanochat.tokenizer import Tokenizer
    from serve_app.config import ServeConfig
    from serve_app.generation import Generation
    from serve_app.models import ServedModel
    from serve_app.testing import synthetic_texts

    tok = Tokenizer.train_from_iterator(synthetic_texts(200), 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    config = ServeConfig(models=[{"name": "m", "model_uri": "/unused", "tool_use": False}], max_batch_size=4)
    served = ServedModel.from_objects(config.models[0], model.eval(), tok, config)
    prompts = [tok.encode("Ka lo", prepend="<|bos|>"), tok.encode("Mi", prepend="<|bos|>")]
    params = SamplingParams(max_new_tokens=12, n=2, seed=3, stop_token_ids=served.stop_ids)

    async def main():
        whole = Generation(served, "g", prompts, params)
        whole.start()
        choices = await whole.collect()
        early = Generation(served, "e", prompts[:1], SamplingParams(max_new_tokens=100, n=2))
        early.start()
        updates = early.updates()
        await updates.__anext__()
        await updates.aclose()  # the client goes away after the first update
        return whole, choices

    try:
        whole, choices = asyncio.run(main())
        wait_for(lambda: served.engine.free_slots() == [0, 1, 2, 3], 10, "the scheduler thread to apply the "
                 "cancel and free every slot", interval=0.02)
    finally:
        served.close()
    assert len(choices) == 4 and all(finish in ("stop", "length") for _, finish in choices)
    assert whole.completion_tokens <= 4 * 12 and whole.prompt_tokens == sum(len(p) for p in prompts)
    assert len({"".join(p.text for p in pieces) for pieces, _ in choices}) > 1


def test_a_repeated_prefix_is_reported_as_cached_tokens() -> None:
    from nanochat.tokenizer import Tokenizer
    from serve_app.config import ServeConfig
    from serve_app.generation import Generation
    from serve_app.models import ServedModel
    from serve_app.responses import usage
    from serve_app.testing import synthetic_texts

    tok = Tokenizer.train_from_iterator(synthetic_texts(200), 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    config = ServeConfig(models=[{"name": "m", "model_uri": "/unused", "tool_use": False}], max_batch_size=2,
                         prefix_block_size=8)
    served = ServedModel.from_objects(config.models[0], model.eval(), tok, config)
    system = tok.encode("Ka lo mi ne ru sa ti vo ze pa. " * 4, prepend="<|bos|>")
    params = SamplingParams(max_new_tokens=4, temperature=0)

    async def run(prompt: list[int]) -> Generation:
        gen = Generation(served, "g", [prompt], params)
        gen.start()
        await gen.collect()
        return gen

    try:
        first = asyncio.run(run(system + [1, 2]))
        second = asyncio.run(run(system + [3, 4, 5]))
    finally:
        served.close()
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(system) // 8 * 8 > 0  # the shared start, in whole blocks
    assert usage(second.prompt_tokens, 4, second.cached_tokens)["prompt_tokens_details"] == {
        "cached_tokens": second.cached_tokens}


def test_unloading_a_model_calls_back_once_and_zeroes_its_gauges(monkeypatch) -> None:
    """Serve's multiplexer unloads a model by calling __del__: the app's callback runs once, and
    ServeMetrics.forget sets the model's gauges to 0 and stops refreshing them."""
    import ray.serve.metrics

    from nanochat.tokenizer import Tokenizer
    from serve_app.config import ServeConfig
    from serve_app.metrics import ServeMetrics
    from serve_app.models import ServedModel
    from serve_app.testing import synthetic_texts

    class FakeMetric:
        def __init__(self, name: str, **_: object) -> None:
            self.name, self.values = name, []

        def set(self, value: float, tags: dict) -> None:
            self.values.append((value, tags["model"]))

        inc = observe = set

    for cls in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(ray.serve.metrics, cls, FakeMetric)
    metrics = ServeMetrics(interval_s=0.05)
    try:
        hook = metrics.watch("m", lambda: 3)
        hook(type("Record", (), {"rows": [0, 1]})(), 5)
        wait_for(lambda: (3, "m") in metrics.queue.values, 10, "the gauge refreshed while loaded", interval=0.02)
        tok = Tokenizer.train_from_iterator(synthetic_texts(50), 280)
        model = GPT(GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                              n_embd=32))
        model.init_weights()
        config = ServeConfig(models=[{"name": "m", "model_uri": "/unused", "tool_use": False}], max_batch_size=2)
        served = ServedModel.from_objects(config.models[0], model.eval(), tok, config)
        calls: list[str] = []
        served.on_close = lambda: (calls.append("m"), metrics.forget("m"))
        served.__del__()  # what the multiplexer does on eviction
        served.close()  # and a later shutdown: the callback does not run twice
        assert calls == ["m"]
        for gauge in (metrics.tps, metrics.batch, metrics.queue):
            assert gauge.values[-1] == (0, "m")
        time.sleep(0.2)
        assert metrics.queue.values[-1] == (0, "m")  # the refresh loop no longer reports the model
    finally:
        metrics.close()
