"""Tests for prefix reuse (nanochat/prefix_cache.py through nanochat/engine.py) and chunked prefill.

Run: PYTHONPATH=. python -m pytest tests/test_prefix_cache.py -q
Two models: the engine tests' mock that reads each row's whole prefix back from the KV cache (a
restored block at a wrong position or from another sequence changes what it emits), and a tiny
random GPT whose greedy output with reuse and chunking must equal the plain engine's token for token.
"""

from __future__ import annotations

import pytest
import torch

from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.prefix_cache import PrefixCache
from tests.test_engine import VOCAB, PrefixModel, digit_sum

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(temperature=0, max_new_tokens=6)
MB = 1 << 20


def gpt(seq_len: int = 160) -> GPT:
    cfg = GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=seq_len, head_dim=32)
    cfg.n_kv_head = 2
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # random weights: informative logits
    return model.eval()


def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> tuple[list[int], int]:
    """One request to the end: (tokens, cached prompt tokens)."""
    slot = engine.add_request(prompt, params)
    cached = engine.cached_tokens(slot)
    while engine.has_unfinished():
        engine.step()
    tokens = engine.result(slot).tokens
    engine.remove(slot)
    return tokens, cached


def conversation(turns: int, system: list[int], seed: int = 0) -> list[list[int]]:
    """User turns of a chat: random token runs of 5..20 ids."""
    g = torch.Generator().manual_seed(seed)
    return [system] + [torch.randint(1, 250, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(turns)]


def chat(engine: Engine, parts: list[list[int]]) -> list[tuple[list[int], int]]:
    """Each turn re-sends the whole history (system, user 1, reply 1, user 2, ...) as a client does."""
    history, out = list(parts[0]), []
    for user in parts[1:]:
        history += user
        reply, cached = run(engine, history)
        out.append((reply, cached))
        history += reply
    return out


def test_multi_turn_reuse_reads_the_right_prefix() -> None:
    parts = conversation(4, system=list(range(1, 40)))
    plain = chat(Engine(PrefixModel(digit_sum, seq_len=256), max_batch_size=2), parts)
    reuse_engine = Engine(PrefixModel(digit_sum, seq_len=256), max_batch_size=2, prefix_cache_bytes=MB,
                          prefix_block_size=4)
    reused = chat(reuse_engine, parts)
    assert [r for r, _ in reused] == [r for r, _ in plain]
    assert reused[0][1] == 0 and all(c == 0 for _, c in plain)
    prompt_len = len(parts[0]) + len(parts[1])
    for turn in range(1, len(reused)):
        previous_reply = reused[turn - 1][0]
        # the previous request was stored whole except its last token (never fed), in blocks of 4
        assert reused[turn][1] == (prompt_len + len(previous_reply) - 1) // 4 * 4
        prompt_len += len(previous_reply) + len(parts[turn + 1])


def test_greedy_output_with_reuse_equals_without() -> None:
    model = gpt()
    system = list(range(100, 150))
    convs = [conversation(3, system, seed=s) for s in range(3)]
    plain = Engine(model, max_batch_size=4)
    reuse = Engine(model, max_batch_size=4, prefix_cache_bytes=4 * MB)
    for i, parts in enumerate(convs):
        want, got = chat(plain, parts), chat(reuse, parts)
        assert [r for r, _ in got] == [r for r, _ in want]
        assert got[0][1] == (0 if i == 0 else 48)  # later conversations: the shared system prompt
        prompt_len = len(parts[0]) + len(parts[1])
        for turn in range(1, len(got)):  # later turns: the history too (whole blocks of 16)
            assert got[turn][1] == (prompt_len + len(got[turn - 1][0]) - 1) // 16 * 16
            prompt_len += len(got[turn - 1][0]) + len(parts[turn + 1])


def test_concurrent_requests_sharing_a_prefix() -> None:
    model = gpt()
    system = list(range(60, 110))
    prompts = [system + [200 + i, 7, 8, 9] for i in range(4)]
    want = Engine(model, max_batch_size=4).generate(prompts, GREEDY)
    engine = Engine(model, max_batch_size=4, prefix_cache_bytes=4 * MB)
    first, cached = run(engine, prompts[0])  # fills the cache with the system prompt
    assert first == want[0].tokens and cached == 0
    slots = [engine.add_request(p, GREEDY) for p in prompts]  # all four in one batch
    assert [engine.cached_tokens(s) for s in slots] == [48] * 4  # the system prompt's 3 whole blocks
    while engine.has_unfinished():
        engine.step()
    assert [engine.result(s).tokens for s in slots] == [g.tokens for g in want]
    for s in slots:
        engine.remove(s)
    # n samples of one prompt share the restored prefix and the prefill
    group = engine.generate([prompts[1]], SamplingParams(temperature=0, max_new_tokens=6, n=3))
    assert [g.tokens for g in group] == [want[1].tokens] * 3


def test_reuse_never_crosses_a_weight_sync() -> None:
    model = gpt()
    prompt = list(range(1, 70))
    engine = Engine(model, max_batch_size=2, prefix_cache_bytes=4 * MB)
    run(engine, prompt)
    _, cached = run(engine, prompt)
    assert cached == 64  # same weights: reused (whole blocks, the last prompt token always fed)

    torch.manual_seed(1)
    new_state = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}
    model.load_state_dict(new_state)  # an RL weight sync (object-store path): in place, same storage
    after, cached = run(engine, prompt)
    assert cached == 0
    assert after == Engine(gpt_with(new_state), max_batch_size=2).generate([prompt], GREEDY)[0].tokens

    _, cached = run(engine, prompt)
    assert cached == 64  # the new version's own blocks are reused
    engine.set_weights_version(7)  # a declared new version (e.g. a broadcast) drops them too
    _, cached = run(engine, prompt)
    assert cached == 0


def test_a_sequence_admitted_before_a_sync_is_not_stored_after_it() -> None:
    model = gpt()
    engine = Engine(model, max_batch_size=2, prefix_cache_bytes=4 * MB)
    slot = engine.add_request(list(range(1, 70)), GREEDY)
    engine.step()  # prefilled with the old weights
    engine.set_weights_version(1)
    while engine.has_unfinished():
        engine.step()
    engine.remove(slot)
    assert len(engine.prefix_cache) == 0


def gpt_with(state: dict) -> GPT:
    model = gpt()
    model.load_state_dict(state)
    return model


def test_lru_eviction_under_the_budget_keeps_recent_chains_whole() -> None:
    model = PrefixModel(digit_sum, seq_len=128)
    block_bytes = 2 * 1 * 1 * 4 * 1 * 4  # k and v, 1 layer, 1 head, 4 tokens, head_dim 1, float32
    engine = Engine(model, max_batch_size=1, prefix_block_size=4, prefix_cache_bytes=10 * block_bytes)
    shared = list(range(1, 9))  # two blocks every prompt shares
    for i in range(6):
        run(engine, shared + [20 + i] * 9, SamplingParams(temperature=0, max_new_tokens=1))
    cache = engine.prefix_cache
    assert len(cache) <= cache.max_blocks == 10 and cache.stats.evicted_blocks > 0
    # the shared blocks (parents of everything) and the most recent prompt's chain survive
    _, cached = run(engine, shared + [25] * 9 + [1], SamplingParams(temperature=0, max_new_tokens=1))
    assert cached == 16
    _, cached = run(engine, shared + [20] * 9 + [1], SamplingParams(temperature=0, max_new_tokens=1))
    assert cached == 8  # the oldest prompt's own blocks were evicted, its shared parents were not


def test_prefix_cache_budget_and_block_size_are_checked() -> None:
    engine = Engine(PrefixModel(digit_sum), max_batch_size=1)
    with pytest.raises(ValueError, match="holds no block"):
        PrefixCache(engine.cache, capacity_bytes=8, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(engine.cache, capacity_bytes=MB, block_size=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        Engine(PrefixModel(digit_sum), prefix_cache_bytes=-1)


# ---- chunked prefill ------------------------------------------------------------------------------


def test_chunked_prefill_interleaves_with_decodes_and_gives_the_same_tokens() -> None:
    model = gpt(seq_len=256)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    short = [[1, 2, 3], [9, 8, 7, 6]]
    long = list(range(1, 200))

    def drive(engine: Engine) -> tuple[list[list[int]], list[str]]:
        slots = [engine.add_request(p, params) for p in short]
        kinds = []
        while engine.has_unfinished():
            if len(kinds) == 3:  # the short prompts were prefilled and decoded twice
                slots.append(engine.add_request(long, params))  # joins two running streams
            plan = engine.schedule()
            kinds.append(plan.kind)
            engine.update_from_output(plan, engine.execute(plan))
        return [engine.result(s).tokens for s in slots], kinds

    want, plain_kinds = drive(Engine(model, max_batch_size=3))
    got, kinds = drive(Engine(model, max_batch_size=3, prefill_chunk_tokens=32))
    assert got == want
    assert plain_kinds[3] == "prefill"  # unchunked: the running streams wait for the whole prompt
    # chunked: the long prompt is prefilled 32 tokens per step while both streams decode, and is
    # not starved: it takes ceil(199 / 32) = 7 steps
    assert kinds[3:10] == ["mixed"] * 7 and kinds[10] == "decode"


def test_packed_mixed_steps_give_the_logits_of_a_full_recompute() -> None:
    model = gpt(seq_len=256)
    engine = Engine(model, max_batch_size=4, prefill_chunk_tokens=24, prefix_cache_bytes=MB)
    run(engine, list(range(30, 90)) + [5])  # stores a prefix the third prompt restores
    seqs = {engine.add_request(p, GREEDY): list(p) for p in ([1, 2, 3], [4, 5, 6, 7])}
    kinds = []
    with torch.no_grad():
        while engine.has_unfinished():
            if len(kinds) == 2:  # two prompts join the decoding pair: one new, one mostly cached
                for p in (list(range(100, 150)), list(range(30, 90)) + [9, 9]):
                    seqs[engine.add_request(p, GREEDY)] = list(p)
            plan = engine.schedule()
            kinds.append(plan.kind)
            logits = engine.execute(plan)
            for i, slot in enumerate(plan.slots):
                full = model(torch.tensor([seqs[slot]]))[0, -1]
                torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=1e-4)
            for out in engine.update_from_output(plan, logits):
                seqs[out.slot].append(out.token)
    assert kinds.count("mixed") >= 3  # 50 new tokens + 14 uncached ones, 24 per step, beside 2 decodes


def test_chunked_prefill_without_packing_reads_the_right_prefix() -> None:
    """A model that cannot take packed rows (the mock) gets the decode and the pieces as two forwards."""
    def drive(engine: Engine) -> list[list[int]]:
        slots = [engine.add_request([1, 2, 3], GREEDY)]
        engine.step()
        slots.append(engine.add_request(list(range(10, 40)), GREEDY))
        while engine.has_unfinished():
            engine.step()
        return [engine.result(s).tokens for s in slots]

    model = PrefixModel(digit_sum)
    assert drive(Engine(model, max_batch_size=2, prefill_chunk_tokens=8)) == drive(Engine(model, max_batch_size=2))
    assert (2, 8) not in model.calls and (1, 8) in model.calls  # pieces of 8, never padded with the decode row


def test_decodes_with_holes_between_rows_give_the_logits_of_a_full_recompute() -> None:
    """Finished slots leave holes; decode rows 0, 2, 4 attend over the covering rows 0..4 (alone
    and packed beside a prompt piece), the holes' outputs dropped."""
    model = gpt(seq_len=256)
    engine = Engine(model, max_batch_size=5, prefill_chunk_tokens=16)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    seqs = {engine.add_request(p, params): list(p) for p in ([1, 2], [3, 4, 5], [6], [7, 8, 9, 10], [11, 12])}
    kinds = []
    with torch.no_grad():
        while engine.has_unfinished():
            if len(kinds) == 1:
                for slot in (1, 3):
                    engine.remove(slot)
                    del seqs[slot]
            if len(kinds) == 3:
                seqs[engine.add_request(list(range(40, 80)), params)] = list(range(40, 80))  # takes slot 1
            plan = engine.schedule()
            kinds.append((plan.kind, plan.decode.slots if plan.decode else ()))
            logits = engine.execute(plan)
            for i, slot in enumerate(plan.slots):
                full = model(torch.tensor([seqs[slot]]))[0, -1]
                torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=1e-4)
            for out in engine.update_from_output(plan, logits):
                seqs[out.slot].append(out.token)
    assert ("decode", (0, 2, 4)) in kinds and ("mixed", (0, 2, 4)) in kinds
