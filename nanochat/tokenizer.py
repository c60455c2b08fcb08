"""nanochat's tokenizer: rustbpe's byte-level BPE plus nanochat's 9 special tokens and chat rendering.

Notable:
- ids 0..255 are bytes, then one id per merge (rustbpe), then the SPECIAL_TOKENS in their order;
  `vocab_size` counts all three. Special tokens never come out of encoding text: a "<|bos|>"
  inside a document is ordinary text.
- training from texts (`Tokenizer.train_from_iterator`) or from chunk-count tables
  (`Tokenizer.train_from_counts`): the cluster's tokenizer stage maps blocks of text to count
  tables with `count_chunks`, sums them with `merge_counts`, then trains on the result.
- count tables are `pyarrow.Table`s with columns `chunk` (large_binary) and `count` (uint64),
  wrapped around rustbpe's buffers without copying.
- `render_conversation` gives ids and a loss mask (1 = tokens the assistant produces);
  `render_for_completion` gives a prompt that ends with <|assistant_start|>.
- `decode` returns str: bytes are decoded as UTF-8 with U+FFFD only where the ids cut or break a
  character (rustbpe's own `decode` returns the exact bytes).
- `to_tiktoken()` and `export_hf(path)` give the same ids through tiktoken and HF `tokenizers`;
  `from_hf_json` reads such a tokenizer.json back (ours, or transformers' NanoChat one), and `load`
  falls back to a directory's tokenizer.json when it has no tokenizer.rbpe.

Saved directory (each file written under a temporary name, then renamed):
    tokenizer.rbpe        merges + split pattern (rustbpe's text format, see rustbpe/src/tokenizer.rs)
    special_tokens.json   {name: id} in id order
    token_bytes.pt        LongTensor[vocab_size]: bytes per token, 0 for special tokens

Tests: `python -m pytest tests/test_tokenizer.py`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import torch

import rustbpe
from nanochat.common import atomic_write
from nanochat.errors import ConfigError, NanochatError, NotFoundError

SPECIAL_TOKENS = (
    "<|bos|>",  # every document starts with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the Python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output (forced, not learned)
    "<|output_end|>",
)
CHUNK_COLUMN = "chunk"
COUNT_COLUMN = "count"
MERGES_FILE = "tokenizer.rbpe"
SPECIALS_FILE = "special_tokens.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
HF_TOKENIZER_FILE = "tokenizer.json"

TextsLike = Sequence[str] | pa.Array | pa.ChunkedArray
CountsLike = pa.Table | pa.RecordBatch | rustbpe.ChunkCounts


def _as_text_array(texts: TextsLike) -> Sequence[str] | pa.Array:
    """A list of str or one contiguous Arrow string array (what rustbpe borrows without copying)."""
    if isinstance(texts, pa.ChunkedArray):
        return texts.cast(pa.large_string()).combine_chunks()
    return texts


def counts_to_table(counts: rustbpe.ChunkCounts) -> pa.Table:
    """Wrap rustbpe counts as a Table(chunk: large_binary, count: uint64) without copying."""
    return pa.Table.from_batches([pa.record_batch(counts)])


def count_chunks(texts: TextsLike, pattern: str | None = None) -> pa.Table:
    """Chunk counts of `texts` (list of str, or a pyarrow string array / chunked array), in parallel."""
    return counts_to_table(rustbpe.count_chunks(_as_text_array(texts), pattern))


def _count_parts(tables: Iterable[CountsLike]) -> list[pa.RecordBatch | rustbpe.ChunkCounts]:
    """Record batches (or rustbpe counts) of count tables, with `count` cast to uint64 if needed."""
    parts: list[pa.RecordBatch | rustbpe.ChunkCounts] = []
    for t in tables:
        if isinstance(t, rustbpe.ChunkCounts):
            parts.append(t)
            continue
        missing = {CHUNK_COLUMN, COUNT_COLUMN} - set(t.schema.names)
        if missing:
            raise ValueError(f"a chunk-count table lacks column(s) {sorted(missing)}; "
                             f"it has {t.schema.names}")
        t = t.select([CHUNK_COLUMN, COUNT_COLUMN])
        if t.schema.field(COUNT_COLUMN).type != pa.uint64():
            t = t.set_column(1, COUNT_COLUMN, t[COUNT_COLUMN].cast(pa.uint64()))
        parts.extend(t.to_batches() if isinstance(t, pa.Table) else [t])
    return parts


def merge_counts(tables: Iterable[CountsLike]) -> pa.Table:
    """Sum several chunk-count tables into one (rows sorted by chunk bytes)."""
    return counts_to_table(rustbpe.merge_counts(_count_parts(tables)))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by HF byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class TokenizerFormatError(NanochatError, ValueError):
    """A tokenizer file that does not hold a nanochat tokenizer (the message says what differs)."""


def _split_pattern(pre: dict | None) -> str | None:
    """The regex of the first Split pre-tokenizer in a tokenizer.json pre_tokenizer tree."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "Split" and isinstance(pre.get("pattern"), dict) and "Regex" in pre["pattern"]:
        return pre["pattern"]["Regex"]
    for child in pre.get("pretokenizers") or []:
        found = _split_pattern(child)
        if found:
            return found
    return None


def _last_merge(token: bytes, ranks: dict[bytes, int], rank: int, where: str) -> tuple[int, int]:
    """The two tokens that rank-based BPE (tiktoken's) joins into `token`, using merges below `rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
        if best[0] >= rank:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2 or ranks.get(parts[0], rank) >= rank or ranks.get(parts[1], rank) >= rank:
        raise TokenizerFormatError(
            f"{where}: token {rank} ({token!r}) is not made by merging two earlier tokens")
    return ranks[parts[0]], ranks[parts[1]]


class Tokenizer:
    """rustbpe merges + nanochat's special tokens (ids right after the merges)."""

    def __init__(self, core: rustbpe.Tokenizer):
        self.core = core
        first = core.vocab_size
        self._special_ids = {name: first + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names = {i: name for name, i in self._special_ids.items()}

    # -- training and persistence ------------------------------------------------------------------

    @staticmethod
    def _base_vocab(vocab_size: int) -> int:
        base = vocab_size - len(SPECIAL_TOKENS)
        if base < 256:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: it must hold the 256 byte tokens and the "
                f"{len(SPECIAL_TOKENS)} special tokens, so at least {256 + len(SPECIAL_TOKENS)}"
            )
        return base

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int,
                            pattern: str | None = None) -> Tokenizer:
        """Train on an iterable of str; `vocab_size` includes bytes, merges and special tokens."""
        return cls(rustbpe.Tokenizer.from_iterator(iter(texts), cls._base_vocab(vocab_size), pattern=pattern))

    @classmethod
    def train_from_counts(cls, table: CountsLike | Iterable[CountsLike], vocab_size: int,
                          pattern: str | None = None) -> Tokenizer:
        """Train on chunk counts (a table from `count_chunks`/`merge_counts`, or several).

        `pattern` must be the one the counts were made with (default: rustbpe.DEFAULT_PATTERN).
        """
        tables = [table] if isinstance(table, CountsLike) else list(table)
        base = cls._base_vocab(vocab_size)
        return cls(rustbpe.Tokenizer.from_counts(_count_parts(tables), base, pattern))

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer files into `directory` (created if needed), each atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / MERGES_FILE, lambda tmp: self.core.save(str(tmp)))
        specials = json.dumps(self._special_ids, indent=1).encode()
        atomic_write(d / SPECIALS_FILE, lambda tmp: tmp.write_bytes(specials))
        token_bytes = self.token_bytes()
        atomic_write(d / TOKEN_BYTES_FILE, lambda tmp: torch.save(token_bytes, tmp))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a directory written by `save`."""
        d = Path(directory)
        if not (d / MERGES_FILE).is_file() and (d / HF_TOKENIZER_FILE).is_file():
            return cls.from_hf_json(json.loads((d / HF_TOKENIZER_FILE).read_text()),
                                    str(d / HF_TOKENIZER_FILE))
        if not (d / MERGES_FILE).is_file():
            raise NotFoundError(f"no tokenizer at {d}: "
                                f"neither {MERGES_FILE} nor {HF_TOKENIZER_FILE} is there "
                                "(train one with jobs.tokenizer)")
        tok = cls(rustbpe.Tokenizer.load(str(d / MERGES_FILE)))
        saved = json.loads((d / SPECIALS_FILE).read_text())
        if saved != tok._special_ids:
            raise ConfigError(
                f"{d / SPECIALS_FILE} holds special tokens {saved}, "
                f"but this code expects {tok._special_ids}: "
                "the tokenizer was saved by another version; retrain it"
            )
        return tok

    # -- vocabulary ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Bytes + merges + special tokens."""
        return self.core.vocab_size + len(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        """The id of a special token, e.g. "<|assistant_end|>"."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; "
                             f"the special tokens are {list(SPECIAL_TOKENS)}") from None

    def id_to_token(self, i: int) -> str:
        """A token as text: the special token's name, or its bytes as UTF-8 (U+FFFD where invalid)."""
        if i in self._special_names:
            return self._special_names[i]
        return self.core.id_to_bytes(i).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """LongTensor[vocab_size]: UTF-8 bytes of each token, 0 for special tokens (for bits per byte)."""
        lengths = [len(b) for b, _ in self.core.get_mergeable_ranks()] + [0] * len(SPECIAL_TOKENS)
        return torch.tensor(lengths, dtype=torch.long)

    # -- encode / decode -----------------------------------------------------------------------------

    def _special_or_id(self, token: str | int | None) -> int | None:
        if token is None:
            return None
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary (size {self.vocab_size})")
        return int(token)

    def encode(self, text: str | Sequence[str], prepend: str | int | None = None,
               append: str | int | None = None,
               num_threads: int | None = None) -> list[int] | list[list[int]]:
        """Ids of one text, or of each text of a list (batched and parallel in Rust over `num_threads`
        threads, None = one per core). `prepend`/`append`: a special token name or an id to add."""
        first, last = self._special_or_id(prepend), self._special_or_id(append)

        def wrap(ids: list[int]) -> list[int]:
            if first is not None:
                ids.insert(0, first)
            if last is not None:
                ids.append(last)
            return ids

        if isinstance(text, str):
            return wrap(self.core.encode(text))
        return [wrap(ids) for ids in self.core.encode_batch(_as_text_array(text), num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens appear as their names."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._special_names:
                parts.append(self.core.decode(run).decode("utf-8", errors="replace"))
                parts.append(self._special_names[i])
                run = []
            else:
                run.append(i)
        parts.append(self.core.decode(run).decode("utf-8", errors="replace"))
        return "".join(parts)

    # -- chat ----------------------------------------------------------------------------------------

    def _render(self, conversation: dict) -> tuple[list[int], list[int]]:
        """Ids and mask of a whole conversation (no truncation)."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages:
            raise ValueError("a conversation is a dict with a non-empty 'messages' list")
        if messages[0].get("role") == "system":
            if (len(messages) < 2 or messages[1].get("role") != "user"
                    or not isinstance(messages[1]["content"], str)):
                raise ValueError("a system message must be followed by a user message with str content")
            merged = copy.deepcopy(messages[1])
            merged["content"] = f"{messages[0]['content']}\n\n{merged['content']}"
            messages = [merged, *messages[2:]]
        ids: list[int] = [self.get_bos_token_id()]
        mask: list[int] = [0]

        def add(tokens: int | list[int], m: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self._special_ids
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            role, content = message.get("role"), message.get("content")
            if role != expected:
                raise ValueError(
                    f"message {i} has role {role!r}, expected {expected!r}: messages must alternate "
                    "user/assistant starting with user (one system message may come first)"
                )
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i} (user) must have str content, "
                                     f"got {type(content).__name__}")
                add(sp["<|user_start|>"], 0)
                add(self.core.encode(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                self._render_part(part, i, add)
            add(sp["<|assistant_end|>"], 1)
        return ids, mask

    def _render_part(self, part: dict, i: int, add: Callable[[int | list[int], int], None]) -> None:
        """One part of an assistant message: text and python are learned (mask 1), tool output is not."""
        sp = self._special_ids
        kind, text = part.get("type"), part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"message {i}: every part needs a str 'text', got {part!r}")
        if kind == "text":
            add(self.core.encode(text), 1)
        elif kind == "python":
            add(sp["<|python_start|>"], 1)
            add(self.core.encode(text), 1)
            add(sp["<|python_end|>"], 1)
        elif kind == "python_output":
            add(sp["<|output_start|>"], 0)
            add(self.core.encode(text), 0)
            add(sp["<|output_end|>"], 0)
        else:
            raise ValueError(f"message {i}: unknown part type {kind!r} "
                             "(expected text, python or python_output)")

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation, truncated to `max_tokens`.

        mask is 1 for what the assistant produces (its text, python code with <|python_start|> and
        <|python_end|>, <|assistant_end|>) and 0 for everything else (<|bos|>, user/system text,
        <|assistant_start|>, tool output between <|output_start|> and <|output_end|>).
        """
        ids, mask = self._render(conversation)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict, continue_last: bool = False) -> list[int]:
        """Prompt ids for the engine: the conversation without its last assistant message (if it
        ends with one), followed by <|assistant_start|>. Not truncated.

        continue_last: the conversation ends with an assistant message the model continues (e.g.
        its tool calls and their outputs, as the service renders function calling): that message
        is kept, without its <|assistant_end|>."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if continue_last:
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError("continue_last needs a conversation that ends with an assistant message")
            ids, _ = self._render(conversation)
            return ids[:-1]  # drop <|assistant_end|>: the turn stays open
        if messages and messages[-1].get("role") == "assistant":
            conversation = {**conversation, "messages": messages[:-1]}
        ids, _ = self._render(conversation)
        return [*ids, self._special_ids["<|assistant_start|>"]]

    # -- other libraries -----------------------------------------------------------------------------

    def to_tiktoken(self):
        """A `tiktoken.Encoding` with the same ids, pattern and special tokens."""
        import tiktoken

        ranks = dict(self.core.get_mergeable_ranks())
        if len(ranks) != self.core.vocab_size:
            raise ValueError("two merges make the same bytes, "
                             "which tiktoken's bytes -> rank table cannot hold")
        return tiktoken.Encoding(name="nanochat", pat_str=self.core.get_pattern(), mergeable_ranks=ranks,
                                 special_tokens=dict(self._special_ids))

    def hf_json(self) -> dict:
        """The HuggingFace `tokenizers` tokenizer.json content (byte-level BPE, same merges and specials)."""
        to_char = _bytes_to_unicode()
        pieces = ["".join(to_char[b] for b in tb) for tb, _ in self.core.get_mergeable_ranks()]
        vocab = {piece: i for i, piece in enumerate(pieces)}
        if len(vocab) != len(pieces):
            raise ValueError("two merges make the same bytes, "
                             "which an HF vocabulary (piece -> id) cannot hold")
        added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for name, i in self._special_ids.items()]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.core.get_pattern()}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                        "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab,
                      "merges": [f"{pieces[a]} {pieces[b]}" for a, b in self.core.get_merges()]},
        }

    @classmethod
    def from_hf_json(cls, data: dict, where: str = "tokenizer.json") -> Tokenizer:
        """The tokenizer of a tokenizer.json in nanochat's layout (what `hf_json` writes, and what
        transformers' NanoChat checkpoints hold): byte-level BPE whose ids 0..255 are the bytes in
        order, whose merges make ids 256, 257, ... in order (one pair each as `hf_json` writes, or
        every split whose halves are tokens, as transformers' tiktoken conversion writes), followed
        by the 9 special tokens in SPECIAL_TOKENS order. TokenizerFormatError names what differs."""
        model = data.get("model") if isinstance(data, dict) else None
        if (not isinstance(model, dict) or model.get("type") != "BPE"
                or not isinstance(model.get("vocab"), dict)):
            raise TokenizerFormatError(
                f"{where} is not a byte-level BPE tokenizer (model.type must be 'BPE')")
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        vocab: dict[str, int] = model["vocab"]
        by_id = {i: piece for piece, i in vocab.items()}
        for b in range(256):
            piece = by_id.get(b)
            if piece is None or len(piece) != 1 or to_byte.get(piece) != b:
                raise TokenizerFormatError(f"{where}: id {b} is {piece!r}, not byte {b}; nanochat tokenizers "
                                           "start with the 256 bytes in order")
        n_merges = len(vocab) - 256
        listed: dict[int, list[tuple[int, int]]] = {}  # merged id -> the pairs tokenizer.json lists for it
        last = 0
        for merge in model.get("merges") or []:
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            made = vocab.get(a + b)
            if a not in vocab or b not in vocab or made is None or made < max(last, 256):
                raise TokenizerFormatError(f"{where}: merge {a!r} + {b!r} is not in nanochat's rank order "
                                           "(each merge must make a token, in increasing id order)")
            listed.setdefault(made, []).append((vocab[a], vocab[b]))
            last = made
        if sorted(listed) != list(range(256, 256 + n_merges)):
            raise TokenizerFormatError(f"{where}: {len(vocab)} vocabulary entries but merges make "
                                       f"{len(listed)} of the {n_merges} tokens above the bytes")
        token_bytes = {i: bytes(to_byte[c] for c in piece) for piece, i in vocab.items()}
        ranks = {tb: i for i, tb in token_bytes.items()}
        merges: list[tuple[int, int]] = []
        for made in range(256, 256 + n_merges):
            pairs = listed[made]
            # one pair: rustbpe's own export; several (transformers' tiktoken conversion lists every split
            # whose halves are tokens): the pair rank-based BPE really merges last, as tiktoken encodes
            merges.append(pairs[0] if len(pairs) == 1 else _last_merge(token_bytes[made], ranks, made, where))
        added = {t.get("content"): t.get("id") for t in data.get("added_tokens") or []}
        want = {name: 256 + len(merges) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if added != want:
            raise TokenizerFormatError(f"{where}: the special tokens are {added}, but a nanochat tokenizer "
                                       f"has exactly {want}")
        pattern = _split_pattern(data.get("pre_tokenizer"))
        if pattern is None:
            raise TokenizerFormatError(f"{where}: no Split regex in its pre_tokenizer (the chunking pattern)")
        try:
            return cls(rustbpe.Tokenizer(merges, pattern))
        except ValueError as e:
            raise TokenizerFormatError(f"{where}: rustbpe rejects its merges or pattern: {e}") from None

    def export_hf(self, path: str | os.PathLike) -> None:
        """Write `hf_json()` to `path` (e.g. .../tokenizer.json) atomically; load it with
        `tokenizers.Tokenizer.from_file(path)`. HF matches special-token text (e.g. "<|bos|>") inside
        raw text, which `encode` never does: set `hf.encode_special_tokens = True` after loading for
        identical ids on such text (the flag is not stored in tokenizer.json)."""
        data = json.dumps(self.hf_json(), ensure_ascii=False).encode()
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
