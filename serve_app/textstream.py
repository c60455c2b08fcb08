"""Token ids of one choice -> what the client sees: text, tool-call parts, stop strings, log-probs.

Notable:
- parts: tokens between <|python_start|> and <|python_end|> are a "python" part (the tool call
  the model wrote), between <|output_start|> and <|output_end|> a "python_output" part (what the
  sandbox answered); everything else is "text". Other special tokens (<|assistant_end|>, <|bos|>,
  ...) are never shown.
- stop strings apply to the text of one contiguous text run: text that could be the beginning of
  a stop string is held back until the next token decides, so a stop string split over several
  tokens never reaches the client; the text before it does, and the choice is over.
- UTF-8: each part has its own incremental decoder, so a character split over tokens is never
  cut (U+FFFD only for bytes that never complete, at a part's end).
- log-probs (text tokens only) are released together with the text that completes them; tokens
  at or after a matched stop string are dropped. Each carries the top alternatives the engine
  reported (special tokens shown by name).
- function calls (`tool_calls=True`, a request with `tools`): a python block is one call, written
  by the grammar as compact JSON `{"name":"f","arguments":{...}}` (serve_app/grammar.py). Its
  first piece names the function (kind "tool_call", `name` and `call_id` set, no text); the next
  pieces are fragments of the arguments' JSON text, the wrapper's closing brace held back.

Pure Python: `python -m pytest tests/test_serve_units.py` exercises it without Ray.
"""

from __future__ import annotations

import codecs
import re
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

PartKind = Literal["text", "python", "python_output", "tool_call"]
CALL_HEAD = re.compile(r'\{"name":"([a-zA-Z0-9_-]{1,64})","arguments":')  # compact, as the grammar writes it


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token and the model's log-probability of it."""

    token: str  # the token's bytes as UTF-8 (U+FFFD where a character is cut)
    bytes: list[int]
    logprob: float
    top_logprobs: tuple[TokenLogprob, ...] = ()  # most likely tokens of the raw distribution


@dataclass
class Piece:
    """Newly visible output of one choice."""

    kind: PartKind
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    call: int | None = None  # tool_call pieces: index of the call within the choice
    name: str | None = None  # set on a call's first piece
    call_id: str | None = None  # set on a call's first piece


@dataclass
class _CallText:
    index: int
    buf: str = ""
    name: str | None = None
    sent: int = 0  # characters of buf already released (head included)


@dataclass(frozen=True)
class ToolTokens:
    """Ids of the tool-block delimiters (None: the tokenizer has no tool tokens)."""

    python_start: int | None = None
    python_end: int | None = None
    output_start: int | None = None
    output_end: int | None = None


class ChoiceText:
    """Turns the tokens of one choice into Pieces; see the module docstring."""

    def __init__(self, token_bytes: Sequence[bytes], tools: ToolTokens, hidden: frozenset[int],
                 stop: Sequence[str] = (), logprobs: bool = False, tool_calls: bool = False,
                 special_names: Mapping[int, str] | None = None) -> None:
        """token_bytes[i]: bytes of token i (b"" for special tokens); hidden: special ids never shown;
        stop: non-empty stop strings; tool_calls: python blocks are function calls;
        special_names: names of special tokens (for top log-probs)."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._token_bytes = token_bytes
        self._tools = tools
        self._hidden = hidden
        self._stop = tuple(stop)
        self._want_logprobs = logprobs
        self._tool_calls = tool_calls
        self._names = special_names or {}
        self._call: _CallText | None = None
        self.calls = 0  # function calls opened so far
        self.kind: PartKind = "text"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # text not yet released (could start a stop string)
        self._text_len = 0  # characters of text decoded so far (released + held)
        self._pending_lp: deque[tuple[int, TokenLogprob]] = deque()  # (end offset, logprob) not released
        self.stopped = False  # a stop string matched: the choice is over

    # ---- public ------------------------------------------------------------------------------

    def push(self, token: int, logprob: float | None = None,
             top: Sequence[tuple[int, float]] = ()) -> list[Piece]:
        """Pieces that became visible with this token (none after a stop string matched);
        top: the engine's (token, log-prob) alternatives."""
        if self.stopped:
            return []
        t = self._tools
        if token in (t.python_start, t.output_start):
            pieces = self._close_part()
            self.kind = "python" if token == t.python_start else "python_output"
            if self._tool_calls and token == t.python_start:
                self.kind, self._call = "tool_call", _CallText(self.calls)
                self.calls += 1
            return pieces
        if token in (t.python_end, t.output_end):
            return self._close_part(complete=True) if self.kind != "text" else []
        if token in self._hidden:
            return []
        raw = self._token_bytes[token]
        text = self._decoder.decode(raw)
        if self.kind == "tool_call":
            return self._call_pieces(text)
        if self.kind != "text":
            return [Piece(self.kind, text)] if text else []
        self._held += text
        self._text_len += len(text)
        if self._want_logprobs and logprob is not None:
            alternatives = tuple(self._entry(i, lp) for i, lp in top)
            self._pending_lp.append((self._text_len, self._entry(token, logprob, alternatives)))
        return self._release(final=False)

    def finish(self) -> list[Piece]:
        """Everything still held back, at the end of the choice."""
        if self.stopped:
            return []
        return self._close_part()

    # ---- internals ----------------------------------------------------------------------------

    def _entry(self, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        raw = self._token_bytes[token] or self._names.get(token, "").encode()
        return TokenLogprob(raw.decode("utf-8", errors="replace"), list(raw), float(logprob), top)

    def _call_pieces(self, text: str, final: bool = False, complete: bool = False) -> list[Piece]:
        """Pieces of the open function call: its head once the name is known, then arguments
        text, holding back the last character (the wrapper's closing brace) until the block ends
        (`complete`: closed by <|python_end|>, so the held brace is the wrapper's; else cut short)."""
        c = self._call
        c.buf += text
        out = []
        if c.name is None:
            head = CALL_HEAD.match(c.buf)
            if head is None:
                return []
            c.name, c.sent = head.group(1), head.end()
            out.append(Piece("tool_call", "", call=c.index, name=c.name,
                             call_id=f"call_{uuid.uuid4().hex[:24]}"))
        end = len(c.buf) if final and not complete else len(c.buf) - 1
        if end > c.sent:
            out.append(Piece("tool_call", c.buf[c.sent:end], call=c.index))
            c.sent = end
        return out

    def _close_part(self, complete: bool = False) -> list[Piece]:
        """End the current part: flush its decoder (and, for text, every held character);
        complete: the part's closing token came (not the end of the choice)."""
        tail = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        kind, self.kind = self.kind, "text"
        if kind == "tool_call":
            pieces = self._call_pieces(tail, final=True, complete=complete)
            self._call = None
            return pieces
        if kind != "text":
            return [Piece(kind, tail)] if tail else []
        self._held += tail
        self._text_len += len(tail)
        return self._release(final=True)

    def _release(self, final: bool) -> list[Piece]:
        """Release held text up to a stop string, or up to what could still start one."""
        held, cut = self._held, len(self._held)
        hits = [i for i in (held.find(s) for s in self._stop) if i >= 0]
        if hits:
            cut = min(hits)
            self.stopped = True
        elif not final:
            cut -= self._stop_prefix_len(held)
        out = held[:cut]
        self._held = "" if self.stopped else held[cut:]
        end = self._text_len - len(held) + cut  # absolute offset released up to
        lps = []
        while self._pending_lp and self._pending_lp[0][0] <= end:
            lps.append(self._pending_lp.popleft()[1])
        if self.stopped:
            self._pending_lp.clear()
        return [Piece("text", out, lps)] if out or lps else []

    def _stop_prefix_len(self, held: str) -> int:
        """Length of the longest suffix of `held` that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self._stop), default=1) - 1
        for k in range(min(len(held), longest), 0, -1):
            suffix = held[-k:]
            if any(s.startswith(suffix) for s in self._stop):
                return k
        return 0


def merge_pieces(pieces: Sequence[Piece]) -> list[Piece]:
    """Adjacent pieces of the same kind joined (for a whole, non-streamed message)."""
    merged: list[Piece] = []
    for p in pieces:
        if merged and merged[-1].kind == p.kind and merged[-1].call == p.call:
            last = merged[-1]
            merged[-1] = Piece(p.kind, last.text + p.text, last.logprobs + p.logprobs, p.call,
                               last.name or p.name, last.call_id or p.call_id)
        else:
            merged.append(Piece(p.kind, p.text, list(p.logprobs), p.call, p.name, p.call_id))
    return merged
