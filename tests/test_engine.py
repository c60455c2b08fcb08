"""Tests for nanochat/engine.py without weights: a mock model on the real KVCache, a byte tokenizer,
and a tiny random GPT whose cached logits must equal a full recompute.

Run: PYTHONPATH=. python -m pytest tests/test_engine.py -q
The mock caches each token id as its key/value (1 layer, 1 head, head_dim 1), so at every
position it can read back the row's whole prefix from the cache and script the next token:
a wrong position, a row mix-up or a stale slot changes what it emits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from nanochat.engine import Engine, ToolUse
from nanochat.gpt import GPTConfig
from nanochat.kv_cache import dense_mask
from nanochat.sampling import IncrementalDecoder, SamplingParams, sample_tokens
from tests.helpers import random_gpt

BOS, PY_START, PY_END, OUT_START, OUT_END, END = range(256, 262)
VOCAB = 262


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class PrefixModel:
    """forward(idx, kv_cache) -> logits: next_token(prefix) gets a logit of 50, or all-zero
    (uniform) logits when it returns None. The prefix is read back from the cache."""

    def __init__(self, next_token: Callable[[list[int]], int | None], seq_len: int = 64) -> None:
        self.next_token = next_token
        self.config = SimpleNamespace(n_layer=1, n_head=1, n_kv_head=1, n_embd=1, sequence_len=seq_len,
                                      vocab_size=VOCAB)
        self.calls: list[tuple[int, int]] = []  # idx shapes, one per forward

    def __call__(self, idx: torch.Tensor, kv_cache) -> torch.Tensor:
        self.calls.append(tuple(idx.shape))
        x = idx.to(torch.float32)[:, None, :, None]  # (B, 1, T, 1): the ids are the keys/values
        _, v_all, mask = kv_cache.insert_kv(0, x, x)  # v_all (B, 1, T_keys, 1), mask (B, 1, T, T_keys)
        mask = dense_mask(mask, v_all, idx.size(1))  # None = every key visible
        logits = torch.zeros(idx.size(0), idx.size(1), VOCAB)
        for b in range(idx.size(0)):
            for t in range(idx.size(1)):
                nxt = self.next_token(v_all[b, 0, mask[b, 0, t], 0].long().tolist())
                if nxt is not None:
                    logits[b, t, nxt] = 50.0
        return logits


def digit_sum(prefix: list[int]) -> int:
    return sum(prefix) % 256


def uniform(prefix: list[int]) -> None:
    return None


# ---- cache, batching, determinism ------------------------------------------------------------


def test_cache_shapes_and_positions() -> None:
    model = PrefixModel(digit_sum)
    engine = Engine(model, max_batch_size=4, max_seq_len=32)
    assert tuple(engine.cache.k.shape) == (1, 4, 1, 32, 1)
    a = engine.add_request([1, 2, 3], SamplingParams(temperature=0))
    b = engine.add_request([4, 5, 6, 7, 8], SamplingParams(temperature=0))
    outs = engine.step()
    assert model.calls == [(2, 5)]  # one padded prefill for both prompts
    assert engine.cache.pos[[a, b]].tolist() == [3, 5]  # pads rolled back
    assert {o.slot: o.token for o in outs} == {a: 6, b: 30}
    engine.step()
    assert model.calls[-1] == (2, 1) and engine.cache.pos[[a, b]].tolist() == [4, 6]


def test_ragged_batch_equals_each_sequence_alone() -> None:
    prompts = [[1], [9, 8, 7, 6, 5, 4, 3], [200, 100], [3, 3, 3, 3]]
    for params in (SamplingParams(temperature=0, max_new_tokens=12),
                   SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, seed=7, logprobs=True)):
        model = PrefixModel(digit_sum if params.temperature == 0 else uniform)
        together = Engine(model, max_batch_size=3).generate(prompts, params)  # 4 prompts, 3 slots
        for i, p in enumerate(prompts):
            alone_params = params if params.seed is None else replace(params, seed=7 + i)
            alone = Engine(model, max_batch_size=1).generate([p], alone_params)[0]
            assert together[i].tokens == alone.tokens and len(alone.tokens) == 12


def test_greedy_follows_the_model() -> None:
    gen = Engine(PrefixModel(digit_sum)).generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=4))[0]
    assert gen.tokens == [3, 6, 12, 24] and gen.mask == [1, 1, 1, 1] and gen.finish_reason == "length"


def test_seed_reproducibility() -> None:
    engine = Engine(PrefixModel(uniform), max_batch_size=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=123)
    first = engine.generate([[1, 2, 3]], params)[0].tokens
    assert engine.generate([[1, 2, 3]], params)[0].tokens == first
    other = engine.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_new_tokens=20, seed=124))
    assert other[0].tokens != first


def test_n_samples_share_one_prefill() -> None:
    model = PrefixModel(uniform)
    engine = Engine(model, max_batch_size=4)
    slots = engine.add_group([5, 6, 7], SamplingParams(n=3, temperature=1.0, seed=1, max_new_tokens=6))
    engine.step()
    assert model.calls == [(1, 3)]  # prefilled once, copied to the other two rows
    assert engine.cache.pos[slots].tolist() == [3, 3, 3]
    while engine.has_unfinished():
        engine.step()
    gens = [engine.result(s).tokens for s in slots]
    assert len({tuple(g) for g in gens}) == 3  # independent samples
    assert model.calls[1:] == [(3, 1)] * 5


def test_stop_tokens_max_tokens_and_full_context() -> None:
    stop_after_3 = PrefixModel(lambda p: END if len(p) == 5 else 65)
    gen = Engine(stop_after_3).generate([[1, 2]], SamplingParams(temperature=0, stop_token_ids=(END,)))[0]
    assert gen.tokens == [65, 65, 65, END] and gen.finish_reason == "stop"
    gen = Engine(stop_after_3).generate([[1, 2]], SamplingParams(temperature=0, max_new_tokens=2))[0]
    assert gen.tokens == [65, 65] and gen.finish_reason == "length"
    gen = Engine(PrefixModel(uniform, seq_len=8)).generate([[1] * 5], SamplingParams(max_new_tokens=50))[0]
    assert len(gen.tokens) == 3 and gen.finish_reason == "length"  # 5 + 3 = the whole context


# ---- sampling ---------------------------------------------------------------------------------


def test_sample_tokens_inverse_cdf_top_k_top_p() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 4))
    ones, zeros = torch.ones(4), torch.zeros(4, dtype=torch.long)
    u = torch.tensor([0.05, 0.25, 0.5, 0.999], dtype=torch.float64)
    assert sample_tokens(logits, ones, zeros, ones, u).tolist() == [0, 1, 2, 2]
    assert sample_tokens(logits, torch.zeros(4), zeros, ones, u).tolist() == [2, 2, 2, 2]  # greedy
    top2 = torch.full((4,), 2, dtype=torch.long)
    assert set(sample_tokens(logits, ones, top2, ones, u).tolist()) == {1, 2}
    assert sample_tokens(logits, ones, zeros, torch.full((4,), 0.5), u).tolist() == [2, 2, 2, 2]
    mixed = sample_tokens(logits, torch.tensor([0.0, 1, 1, 1]), torch.tensor([0, 1, 0, 0]),
                          torch.tensor([1.0, 1, 0.75, 1]), torch.tensor([0.05] * 4, dtype=torch.float64))
    assert mixed.tolist() == [2, 2, 1, 0]  # per-row settings; row 3 as if alone


def test_bad_input_raises_clear_errors() -> None:
    engine = Engine(PrefixModel(uniform, seq_len=16))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="no room"):
        engine.add_request(list(range(16)), SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, VOCAB], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[1], []], SamplingParams())
    assert engine.free_slots() == list(range(8))  # nothing was admitted


# ---- slots ------------------------------------------------------------------------------------


def test_slot_reuse_after_removal() -> None:
    engine = Engine(PrefixModel(digit_sum), max_batch_size=1)
    params = SamplingParams(temperature=0, max_new_tokens=5)
    slot = engine.add_request([7, 7, 7], params)
    engine.step()
    engine.step()
    engine.remove(slot)  # cancelled mid-generation
    other = engine.add_request([1], params)
    with pytest.raises(RuntimeError, match="free"):
        engine.add_request([1], params)
    engine.remove(other)
    again = engine.add_request([1, 2], params)
    assert again == slot
    while engine.has_unfinished():
        engine.step()
    fresh = Engine(PrefixModel(digit_sum), max_batch_size=1).generate([[1, 2]], params)[0]
    assert engine.result(again).tokens == fresh.tokens == [3, 6, 12, 24, 48]


def test_stream_yields_tokens_and_frees_slots_when_closed() -> None:
    engine = Engine(PrefixModel(digit_sum), max_batch_size=2)
    stream = engine.stream([[1], [2], [3]], SamplingParams(temperature=0, max_new_tokens=4))
    first = [next(stream) for _ in range(2)]
    assert [(row, out.token) for row, out in first] == [(0, 1), (1, 2)]
    stream.close()
    assert engine.free_slots() == [0, 1]


def test_incremental_decoder_never_splits_a_character() -> None:
    text = "héllo 🙂 wörld"
    dec = IncrementalDecoder(lambda t: bytes([t]))
    pieces = [dec.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[text.encode().index("🙂".encode()):][:4] == ["", "", "", "🙂"]
    dec = IncrementalDecoder(lambda t: bytes([t]))
    assert dec.push(0xF0) == "" and dec.flush() == "\ufffd"


# ---- tool use ---------------------------------------------------------------------------------


def tool_script(prefix: list[int]) -> int:
    """After the prompt [BOS]: call the tool on '1+2', then end once the output is closed."""
    script = [PY_START, *encode("1+2"), PY_END]
    if OUT_END in prefix:
        return END
    done = len(prefix) - 1
    return script[done] if done < len(script) else 0  # 0 would be a bug: we wait for the tool


def test_tool_use_injects_output_and_masks_forced_tokens() -> None:
    calls = []

    def run(code: str) -> str:
        calls.append(code)
        return str(eval(code))

    tool = ToolUse(run, encode, decode, PY_START, PY_END, OUT_START, OUT_END)
    engine = Engine(PrefixModel(tool_script), max_batch_size=2, tool_use=tool)
    params = SamplingParams(temperature=0, stop_token_ids=(END,), logprobs=True)
    gens = engine.generate([[BOS], [BOS]], params)
    slot = engine.add_request([BOS], params)  # the slot API records the same
    while engine.has_unfinished():
        engine.step()
    gens.append(engine.result(slot))
    engine.close()
    expected = [PY_START, *encode("1+2"), PY_END, OUT_START, *encode("3"), OUT_END, END]
    for gen in gens:
        assert gen.tokens == expected and gen.finish_reason == "stop"
        assert gen.mask == [1] * 5 + [0, 0, 0] + [1]
        assert len(gen.logprobs) == len(expected)
    assert calls == ["1+2"] * 3


def test_tool_use_with_the_real_sandbox() -> None:
    sandbox_mod = pytest.importorskip("nanochat.sandbox")
    sandbox = sandbox_mod.Sandbox(sandbox_mod.SandboxLimits(timeout_s=10))

    def run(code: str) -> str:
        return sandbox_mod.format_tool_output(sandbox.run(code))

    tool = ToolUse(run, encode, decode, PY_START, PY_END, OUT_START, OUT_END)
    engine = Engine(PrefixModel(tool_script), tool_use=tool)
    gen = engine.generate([[BOS]], SamplingParams(temperature=0, stop_token_ids=(END,)))[0]
    engine.close()
    assert decode([t for t, m in zip(gen.tokens, gen.mask, strict=True) if m == 0]) == "3"


# ---- a real tiny GPT ----------------------------------------------------------------------------


# group-query attention: 4 query heads share 2 kv heads; built by random_gpt (every weight random: nanochat's
# init zeroes the output layers, random weights make the logits informative)
TINY_GPT = replace(GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=48, head_dim=32), n_kv_head=2)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=10),
                                    SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_new_tokens=10)])
def test_cached_logits_equal_full_recompute(params: SamplingParams) -> None:
    model = random_gpt(TINY_GPT)
    engine = Engine(model, max_batch_size=3)
    prompts = {engine.add_request(p, params): list(p) for p in ([5, 17, 30], [BOS, 1, 2, 3, 4, 5, 6], [99])}
    steps = 0
    with torch.no_grad():
        while engine.has_unfinished():
            plan = engine.schedule()
            logits = engine.execute(plan)
            for i, slot in enumerate(plan.slots):
                full = model(torch.tensor([prompts[slot]]))[0, -1]
                torch.testing.assert_close(logits[i], full, atol=1e-5, rtol=1e-5)
            for out in engine.update_from_output(plan, logits):
                prompts[out.slot].append(out.token)
            steps += 1
    assert steps == 10  # one prefill of the ragged batch, then 9 decode steps for all three rows
    assert all(len(seq) >= 11 for seq in prompts.values())


def test_real_gpt_logprobs_and_greedy_determinism() -> None:
    model = random_gpt(TINY_GPT)
    params = SamplingParams(temperature=0, max_new_tokens=8, logprobs=True)
    gens = Engine(model, max_batch_size=2).generate([[1, 2, 3], [40, 41]], params)
    assert Engine(model, max_batch_size=2).generate([[1, 2, 3], [40, 41]], params) == gens
    with torch.no_grad():
        for prompt, gen in zip([[1, 2, 3], [40, 41]], gens, strict=True):
            seq = prompt + gen.tokens
            logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0], -1)  # (T, V)
            for k, tok in enumerate(gen.tokens):
                row = logp[len(prompt) - 1 + k]
                assert tok == int(row.argmax())
                assert abs(gen.logprobs[k] - float(row[tok])) < 1e-5
