"""Tests for the rustbpe extension: training against a pure-Python reference BPE, encoding against
tiktoken, splitting against the `regex` module, chunk counts and their Arrow form, bad input.

Run: `python -m pytest tests/test_rustbpe.py` (needs the rustbpe wheel installed, see rustbpe/Cargo.toml).
"""

from __future__ import annotations

import gc
from collections import Counter

import pyarrow as pa
import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe

# -- a small, obviously correct reference --------------------------------------------------------


def merge_ids(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace `pair` by `new_id` left to right without overlap."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_merges(chunk_counts: dict[bytes, int], num_merges: int) -> list[tuple[int, int]]:
    """BPE with a full recount per merge; ties go to the smallest (left, right) pair."""
    words = [(list(chunk), n) for chunk, n in chunk_counts.items()]
    merges = []
    for k in range(num_merges):
        pairs: Counter[tuple[int, int]] = Counter()
        for ids, n in words:
            for p in zip(ids, ids[1:], strict=False):
                pairs[p] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        words = [(merge_ids(ids, best, 256 + k), n) for ids, n in words]
        merges.append(best)
    return merges


def chunk_counts(texts: list[str]) -> dict[bytes, int]:
    table = pa.record_batch(rustbpe.count_chunks(texts))
    return dict(zip(table["chunk"].to_pylist(), table["count"].to_pylist(), strict=True))


def regex_chunks(text: str) -> list[str]:
    return regex.findall(rustbpe.DEFAULT_PATTERN, text)


CORPORA = {
    "english": ["The quick brown fox jumps over the lazy dog. " * 3, "Then the fox slept; the dog didn't."],
    "repeats": ["a" * n for n in range(1, 30)] + ["aaaa aaa aa a", "abababab", "aaabaaab"],
    "ties": ["ab cd ef gh", "ba dc fe hg", "xy yx"],
    "non_ascii": ["héllo wörld ça ñandú", "中文中文中文 日本語", "Ελληνικά кириллица 한국어"],
    "emoji": ["😀😀😀 👍🏽👍🏽 👨‍👩‍👧 🇫🇷🇫🇷", "emoji😀text😀", "e\u0301 combining\u0301 marks"],
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_training_equals_reference_bpe(name):
    texts = CORPORA[name]
    counts = chunk_counts(texts)
    expected = reference_merges(counts, 60)
    tok = rustbpe.Tokenizer.from_iterator(iter(texts), 256 + len(expected))
    assert tok.get_merges() == expected
    assert rustbpe.Tokenizer.from_counts(rustbpe.count_chunks(texts), 256 + len(expected)).get_merges() == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab c\n1é😀", max_size=25), min_size=1, max_size=8), st.integers(1, 40))
def test_training_equals_reference_on_random_corpora(texts, num_merges):
    counts = chunk_counts(texts)
    expected = reference_merges(counts, num_merges)
    if not counts:
        with pytest.raises(ValueError, match="empty"):
            rustbpe.Tokenizer.from_iterator(iter(texts), 256 + num_merges)
        return
    if len(expected) < num_merges:  # the corpus runs out of pairs: a clear error, not fewer merges
        with pytest.raises(ValueError, match="no pair left"):
            rustbpe.Tokenizer.from_iterator(iter(texts), 256 + num_merges)
    assert rustbpe.Tokenizer.from_iterator(iter(texts), 256 + len(expected)).get_merges() == expected


def test_train_from_iterator_trains_in_place_as_nanochat_calls_it():
    """nanochat's contract: `tok = Tokenizer(); tok.train_from_iterator(texts, vocab_size)`."""
    texts = CORPORA["english"]
    expected = rustbpe.Tokenizer.from_iterator(iter(texts), 280).get_merges()
    tok = rustbpe.Tokenizer()
    assert tok.vocab_size == 256
    assert tok.train_from_iterator(iter(texts), 280) is None
    assert tok.vocab_size == 280 and tok.get_merges() == expected
    again = rustbpe.Tokenizer()
    again.train_from_iterator(texts, vocab_size=280, buffer_size=1, pattern=rustbpe.DEFAULT_PATTERN)
    assert again.get_merges() == expected  # counting in rounds of one text changes nothing
    by_counts = rustbpe.Tokenizer()
    by_counts.train_from_counts(rustbpe.count_chunks(texts), 280)
    assert by_counts.get_merges() == expected
    with pytest.raises(ValueError, match="below 256"):
        tok.train_from_iterator(iter(texts), 100)
    assert tok.get_merges() == expected, "a failed training must leave the tokenizer as it was"
    with pytest.raises(ValueError, match="buffer_size"):
        tok.train_from_iterator(iter(texts), 280, buffer_size=0)
    with pytest.raises(TypeError):  # the old static call shape fails loudly instead of doing nothing
        rustbpe.Tokenizer.train_from_iterator(iter(texts), 280)


def test_merge_i_makes_id_256_plus_i():
    tok = rustbpe.Tokenizer.from_iterator(iter(["hello hello hello"]), 260)
    merges = tok.get_merges()
    for i, (a, b) in enumerate(merges):
        assert tok.id_to_bytes(256 + i) == tok.id_to_bytes(a) + tok.id_to_bytes(b)
    assert [tok.id_to_bytes(b) for b in range(256)] == [bytes([b]) for b in range(256)]


# -- encoding ------------------------------------------------------------------------------------

TRAIN_TEXT = [
    "The tokenizer learns merges from chunks of text. It's fast, isn't it? 12345 67 8.",
    "def encode(self, text):\n    return [self.ranks[b] for b in text.encode('utf-8')]\n",
    "Unicode: naïve café, 中文字符测试, emoji 😀👍🏽, Ελληνικά, русский текст.",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbbbbbb",
] * 5


@pytest.fixture(scope="module")
def rust_tok() -> rustbpe.Tokenizer:
    return rustbpe.Tokenizer.from_iterator(iter(TRAIN_TEXT), 420)


@pytest.fixture(scope="module")
def tiktoken_enc(rust_tok) -> tiktoken.Encoding:
    return tiktoken.Encoding("test", pat_str=rust_tok.get_pattern(),
                             mergeable_ranks=dict(rust_tok.get_mergeable_ranks()), special_tokens={})


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_ids_equal_tiktoken_and_decode_round_trips(rust_tok, tiktoken_enc, s):
    ids = rust_tok.encode(s)
    assert ids == tiktoken_enc.encode_ordinary(s)
    assert rust_tok.decode(ids) == s.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aá1² \t\n\r'sSſlLvVeEK.,😀中\u0301\u00a0\u2028")), max_size=60))
def test_default_splitter_equals_regex_module(s):
    # An alphabet of long-assigned characters: the `regex` module may know a newer Unicode version
    # than the Rust regex tables (which tiktoken shares), and classify new code points differently.
    table = pa.record_batch(rustbpe.count_chunks([s]))
    assert dict(zip(table["chunk"].to_pylist(), table["count"].to_pylist(), strict=True)) == {
        c.encode(): n for c, n in Counter(regex_chunks(s)).items()
    }


@pytest.mark.parametrize("text", [
    "",
    "a",
    "a" * 5000,  # one long chunk: the heap merge path
    "ab" * 3000,
    "x" + "aaaab" * 1000,
    "😀" * 500,
    "naïve café 中文 " * 100,
])
def test_long_and_edge_texts_equal_tiktoken(rust_tok, tiktoken_enc, text):
    assert rust_tok.encode(text) == tiktoken_enc.encode_ordinary(text)


def test_batch_encode_equals_single_encodes(rust_tok):
    texts = TRAIN_TEXT + ["", "x", "the the the"]
    assert rust_tok.encode_batch(texts) == [rust_tok.encode(t) for t in texts]
    arrow = pa.array(texts, pa.large_string())
    assert rust_tok.encode_batch(texts, num_threads=1) == rust_tok.encode_batch(arrow, num_threads=2)
    with pytest.raises(ValueError, match="num_threads"):
        rust_tok.encode_batch(texts, num_threads=0)


def test_decode_is_bytes_even_when_ids_split_a_character(rust_tok):
    ids = list("é".encode())  # two byte tokens of one character
    assert rust_tok.decode(ids[:1]) == b"\xc3"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rust_tok.decode([rust_tok.vocab_size])


def test_custom_pattern_uses_the_regex_engine():
    tok = rustbpe.Tokenizer.from_iterator(iter(["ab ab ab cd"]), 258, pattern=r"\w+|\s+")
    assert tok.get_pattern() == r"\w+|\s+"
    assert tok.encode("ab ab") == [256, 32, 256]
    with pytest.raises(ValueError, match="does not compile"):
        rustbpe.Tokenizer(pattern="(")


# -- chunk counts and Arrow ----------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=12), st.data())
def test_counts_of_split_blocks_merge_to_counts_of_the_whole(texts, data):
    cut = data.draw(st.integers(0, len(texts)))
    whole = pa.record_batch(rustbpe.count_chunks(texts))
    merged = pa.record_batch(rustbpe.merge_counts([rustbpe.count_chunks(texts[:cut]),
                                                   pa.record_batch(rustbpe.count_chunks(texts[cut:]))]))
    assert merged.equals(whole)
    assert sum(whole["count"].to_pylist()) == sum(rustbpe.count_chunks([t]).total for t in texts)


def test_counts_are_arrow_buffers_shared_without_copy():
    counts = rustbpe.count_chunks(["b a b", "a c"])
    first, second = pa.record_batch(counts), pa.record_batch(counts)
    assert first.schema == pa.schema([pa.field("chunk", pa.large_binary(), False),
                                      pa.field("count", pa.uint64(), False)])
    assert first["chunk"].buffers()[2].address == second["chunk"].buffers()[2].address
    assert first["chunk"].to_pylist() == [b" a", b" b", b" c", b"a", b"b"]  # sorted by bytes
    del counts, second
    gc.collect()
    assert first["count"].to_pylist() == [1, 1, 1, 1, 1]  # the batch keeps the Rust buffers alive


def test_merge_accepts_sliced_and_int32_offset_tables():
    batch = pa.record_batch({"chunk": pa.array([b"x", b"y", b"z"], pa.binary()),
                             "count": pa.array([1, 2, 3], pa.uint64())})
    merged = pa.record_batch(rustbpe.merge_counts([batch.slice(1, 2), batch]))
    assert merged.to_pydict() == {"chunk": [b"x", b"y", b"z"], "count": [1, 4, 6]}


def test_arrow_text_input_equals_list_input():
    texts = ["hello world", "naïve café 😀", ""]
    expected = pa.record_batch(rustbpe.count_chunks(texts))
    for arr in (pa.array(texts), pa.array(texts, pa.large_string()), pa.array(["pad", *texts])[1:]):
        assert pa.record_batch(rustbpe.count_chunks(arr)).equals(expected)


# -- bad input -----------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="below 256"):
        rustbpe.Tokenizer.from_iterator(iter(["abc"]), 255)
    with pytest.raises(ValueError, match="empty"):
        rustbpe.Tokenizer.from_iterator(iter([]), 300)
    with pytest.raises(ValueError, match="empty"):
        rustbpe.Tokenizer.from_iterator(iter(["", ""]), 300)
    with pytest.raises(TypeError, match="text 1 has type int"):
        rustbpe.Tokenizer.from_iterator(iter(["ok", 3]), 300)
    with pytest.raises(TypeError, match="text 0 has type bytes"):
        rustbpe.count_chunks([b"abc"])
    with pytest.raises(TypeError, match="not a single str"):
        rustbpe.count_chunks("abc")
    with pytest.raises(ValueError, match="not valid Unicode"):
        rustbpe.Tokenizer.from_iterator(iter(["a\ud800b"]), 300)
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        rustbpe.Tokenizer().encode("lone \udc00 surrogate")
    with pytest.raises(ValueError, match="null"):
        rustbpe.count_chunks(pa.array(["a", None]))
    with pytest.raises(ValueError, match="count"):
        rustbpe.merge_counts([pa.record_batch({"chunk": pa.array([b"a"]), "n": pa.array([1], pa.uint64())})])
    with pytest.raises(ValueError, match="uint64"):
        rustbpe.merge_counts([pa.record_batch({"chunk": pa.array([b"a"]), "count": pa.array([1])})])
    with pytest.raises(ValueError, match="not made before"):
        rustbpe.Tokenizer([(300, 1)])


def test_save_load_round_trip_and_failed_save_leaves_nothing(rust_tok, tmp_path):
    path = tmp_path / "tok.rbpe"
    rust_tok.save(str(path))
    assert path.read_text().startswith("rustbpe merges v1\n")
    back = rustbpe.Tokenizer.load(str(path))
    assert back.get_merges() == rust_tok.get_merges() and back.get_pattern() == rust_tok.get_pattern()
    assert back.encode(TRAIN_TEXT[2]) == rust_tok.encode(TRAIN_TEXT[2])
    with pytest.raises(ValueError, match="cannot save"):
        rust_tok.save(str(tmp_path / "missing_dir" / "tok.rbpe"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.rbpe"]
    (tmp_path / "bad.rbpe").write_text("rustbpe merges v1\npattern 99\nab\n")
    with pytest.raises(ValueError, match="bad.rbpe"):
        rustbpe.Tokenizer.load(str(tmp_path / "bad.rbpe"))
