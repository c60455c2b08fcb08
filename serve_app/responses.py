"""OpenAI response bodies and server-sent-event chunks, built as plain dicts (no per-token pydantic).

Chat: `chat.completion` / `chat.completion.chunk`; text: `text_completion`. Tool use shows up as
an extension the `openai` client keeps in `model_extra`: a streamed delta carries
`nanochat_part: {"type": "python" | "python_output", "text": ...}`, a whole message carries
`nanochat_parts` (all parts in order, text included) next to `content` (the text alone).
Function calls follow OpenAI: `message.tool_calls` (content null when there is no text) and
finish_reason "tool_calls"; streamed, a call's first delta carries its index, id, type and name with
empty arguments, the next ones fragments of `function.arguments`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from serve_app.textstream import Piece, TokenLogprob, merge_pieces

DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI usage; cached_tokens: prompt tokens restored from the prefix cache, not prefilled."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(lps: Sequence[TokenLogprob]) -> dict:
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes}
                                          for t in lp.top_logprobs]}
                        for lp in lps]}


def completion_logprobs(lps: Sequence[TokenLogprob], offset: int) -> dict:
    """Legacy completions log-probs; `offset` is the character offset of the first token."""
    offsets, at = [], offset
    for lp in lps:
        offsets.append(at)
        at += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{**{t.token: t.logprob for t in lp.top_logprobs}, lp.token: lp.logprob}
                             for lp in lps],
            "text_offset": offsets}


def piece_delta(piece: Piece) -> dict:
    if piece.kind == "text":
        return {"content": piece.text}
    if piece.kind == "tool_call":
        call: dict = {"index": piece.call, "function": {"arguments": piece.text}}
        if piece.name is not None:
            call.update(id=piece.call_id, type="function")
            call["function"]["name"] = piece.name
        return {"tool_calls": [call]}
    return {"nanochat_part": {"type": piece.kind, "text": piece.text}}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None, with_usage: bool = False) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None  # OpenAI sends null on every chunk but the last when usage is asked for
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, usage_: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def text_chunk(rid: str, created: int, model: str, index: int, text: str, finish_reason: str | None = None,
               logprobs: dict | None = None, with_usage: bool = False) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_response(rid: str, created: int, model: str, choices: Sequence[tuple[list[Piece], str]],
                  usage_: dict, logprobs: bool) -> dict:
    """choices: (pieces, finish_reason) per choice, in index order."""
    out = []
    for i, (pieces, finish) in enumerate(choices):
        parts = merge_pieces(pieces)
        text = [p for p in parts if p.kind == "text"]
        calls = [p for p in parts if p.kind == "tool_call"]
        message: dict = {"role": "assistant", "content": "".join(p.text for p in text)}
        if calls:
            message["content"] = message["content"] or None
            message["tool_calls"] = [{"id": p.call_id, "type": "function",
                                      "function": {"name": p.name, "arguments": p.text}} for p in calls]
        elif any(p.kind != "text" for p in parts):
            message["nanochat_parts"] = [{"type": p.kind, "text": p.text} for p in parts]
        lps = chat_logprobs([lp for p in text for lp in p.logprobs]) if logprobs else None
        out.append({"index": i, "message": message, "logprobs": lps, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": out,
            "usage": usage_}


def completion_response(rid: str, created: int, model: str, choices: Sequence[tuple[list[Piece], str]],
                        usage_: dict, logprobs: bool) -> dict:
    out = []
    for i, (pieces, finish) in enumerate(choices):
        text = [p for p in pieces if p.kind == "text"]
        lps = completion_logprobs([lp for p in text for lp in p.logprobs], 0) if logprobs else None
        out.append({"index": i, "text": "".join(p.text for p in text), "logprobs": lps,
                    "finish_reason": finish})
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": out,
            "usage": usage_}
