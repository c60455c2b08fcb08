"""Tests for nanochat/tokenizer.py: special tokens, encode/decode, chat rendering masks and truncation,
save/load, count tables, and identical ids through tiktoken and a HuggingFace tokenizer.json.

A tiny tokenizer is trained in a fixture; no files or network needed.
Run: `python -m pytest tests/test_tokenizer.py`.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    count_chunks,
    merge_counts,
)

CORPUS = [
    "Hello! How are you today? I'm fine, thanks. The weather is nice.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "The answer is 42. Let me compute 12 * 7 = 84 with Python.",
    "Unicode too: café, naïve, 中文, emoji 😀👍🏽, Ελληνικά.",
] * 10
VOCAB = 300 + len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(CORPUS, VOCAB)


def test_special_tokens_follow_the_merges(tok):
    assert tok.vocab_size == VOCAB
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(300, VOCAB))
    assert tok.get_bos_token_id() == 300
    assert tok.id_to_token(300) == "<|bos|>"
    assert tok.id_to_token(ord("a")) == "a"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_encode_prepend_append_and_batches(tok):
    ids = tok.encode("Hello world")
    assert tok.encode("Hello world", prepend="<|bos|>", append=tok.encode_special("<|user_end|>")) == [
        300, *ids, tok.encode_special("<|user_end|>")]
    batch = tok.encode(["Hello world", "", "café"], prepend="<|bos|>", num_threads=2)
    assert batch == [[300, *ids], [300], [300, *tok.encode("café")]]
    assert tok.encode("<|bos|>") != [300], "special tokens are never parsed out of text"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("x", append=VOCAB)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_decode_inverts_encode_on_any_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_decode_shows_specials_and_replaces_only_broken_characters(tok):
    ids = tok.encode("héllo", prepend="<|bos|>", append="<|assistant_end|>")
    assert tok.decode(ids) == "<|bos|>héllo<|assistant_end|>"
    assert tok.decode([0xC3]) == "\ufffd"  # half of "é": unavoidable replacement
    assert tok.decode(torch.tensor(tok.encode("ok"))) == "ok"


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.long and tb.shape == (VOCAB,)
    assert tb[:256].tolist() == [1] * 256
    assert tb[300:].tolist() == [0] * len(SPECIAL_TOKENS)
    assert all(tb[i] == len(tok.core.id_to_bytes(i)) for i in range(256, 300))


# -- chat ----------------------------------------------------------------------------------------

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "It is 5."},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_render_conversation_masks_exactly_what_the_assistant_produces(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    sp = tok.encode_special
    expected: list[tuple[list[int], int]] = [
        ([sp("<|bos|>")], 0),
        ([sp("<|user_start|>")], 0), (tok.encode("Be brief.\n\nWhat is 2+3?"), 0), ([sp("<|user_end|>")], 0),
        ([sp("<|assistant_start|>")], 0),
        (tok.encode("Let me check."), 1),
        ([sp("<|python_start|>")], 1), (tok.encode("2+3"), 1), ([sp("<|python_end|>")], 1),
        ([sp("<|output_start|>")], 0), (tok.encode("5"), 0), ([sp("<|output_end|>")], 0),
        (tok.encode("It is 5."), 1),
        ([sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>")], 0), (tok.encode("Thanks"), 0), ([sp("<|user_end|>")], 0),
        ([sp("<|assistant_start|>")], 0), (tok.encode("You're welcome."), 1), ([sp("<|assistant_end|>")], 1),
    ]
    assert ids == [i for part, _ in expected for i in part]
    assert mask == [m for part, m in expected for _ in part]


def test_render_truncates_and_validates(tok):
    full, full_mask = tok.render_conversation(CONVERSATION)
    ids, mask = tok.render_conversation(CONVERSATION, max_tokens=7)
    assert ids == full[:7] and mask == full_mask[:7]
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(ValueError, match="non-empty"):
        tok.render_conversation({"messages": []})
    with pytest.raises(ValueError, match="unknown part type"):
        tok.render_conversation({"messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": [{"type": "img", "text": ""}]}]})


def test_render_for_completion_ends_with_assistant_start(tok):
    prompt = tok.render_for_completion(CONVERSATION)
    ids, _ = tok.render_conversation(CONVERSATION)
    cut = len(ids) - 1 - ids[::-1].index(tok.encode_special("<|assistant_start|>"))
    assert prompt == ids[:cut + 1]
    open_ended = {"messages": CONVERSATION["messages"][:-1]}
    assert tok.render_for_completion(open_ended) == prompt


# -- persistence and other libraries -------------------------------------------------------------


def test_save_load_round_trip_writes_only_final_files(tok, tmp_path):
    tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "special_tokens.json", "token_bytes.pt", "tokenizer.rbpe"]
    back = Tokenizer.load(tmp_path / "tok")
    assert back.vocab_size == tok.vocab_size
    assert back.encode(CORPUS[3]) == tok.encode(CORPUS[3])
    assert torch.equal(torch.load(tmp_path / "tok" / "token_bytes.pt"), tok.token_bytes())
    specials = json.loads((tmp_path / "tok" / "special_tokens.json").read_text())
    assert specials["<|bos|>"] == 300
    (tmp_path / "tok" / "special_tokens.json").write_text(json.dumps({"<|bos|>": 1}))
    with pytest.raises(ValueError, match="retrain"):
        Tokenizer.load(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="tokenizer.rbpe"):
        Tokenizer.load(tmp_path / "nothing")


def test_tiktoken_gives_identical_ids(tok):
    enc = tok.to_tiktoken()
    text = " ".join(CORPUS[:4])
    assert enc.encode_ordinary(text) == tok.encode(text)
    assert enc.encode("<|bos|>hi", allowed_special="all") == [300, *tok.encode("hi")]
    assert enc.n_vocab == tok.vocab_size


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory) -> tokenizers.Tokenizer:
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.export_hf(path)
    return tokenizers.Tokenizer.from_file(str(path))


def test_hf_tokenizer_json_gives_identical_ids(tok, hf_tok):
    texts = [*CORPUS[:4], "  leading spaces\n\n\ttabs  and trailing   ", "numbers 1234567 3.14159", "I'LL we've"]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False).ids == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.token_to_id("<|assistant_end|>") == tok.encode_special("<|assistant_end|>")
    assert hf_tok.get_vocab_size() == tok.vocab_size


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_hf_ids_equal_on_random_unicode(tok, hf_tok, s):
    # HF splits special-token text out of raw text unless told not to (not saved in tokenizer.json).
    hf_tok.encode_special_tokens = True
    assert hf_tok.encode(s, add_special_tokens=False).ids == tok.encode(s)


# -- training from count tables ------------------------------------------------------------------


def test_count_tables_merge_and_train_like_the_iterator(tok):
    halves = [count_chunks(CORPUS[:17]), count_chunks(pa.chunked_array([CORPUS[17:25], CORPUS[25:]]))]
    assert halves[0].schema.names == ["chunk", "count"]
    assert halves[0].schema.field("count").type == pa.uint64()
    merged = merge_counts(halves)
    assert merged.equals(count_chunks(CORPUS))
    from_counts = Tokenizer.train_from_counts(merged, VOCAB)
    assert from_counts.core.get_merges() == tok.core.get_merges()
    assert Tokenizer.train_from_counts(halves, VOCAB).core.get_merges() == tok.core.get_merges()
    int64_counts = merged.set_column(1, "count", merged["count"].cast(pa.int64()))
    assert Tokenizer.train_from_counts(int64_counts, VOCAB).core.get_merges() == tok.core.get_merges()


def test_vocab_size_must_hold_bytes_and_specials():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(CORPUS, 264)
    with pytest.raises(ValueError, match="lacks column"):
        Tokenizer.train_from_counts(pa.table({"text": ["a"]}), 300)
