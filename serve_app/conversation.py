"""OpenAI chat messages to nanochat's conversation (what `Tokenizer.render_conversation` renders), with
function calling mapped onto the tool tokens; `to_conversation` documents the mapping. Bad messages
raise `ApiError` (a 400 naming the message)."""

from __future__ import annotations

import json
from typing import Any

from serve_app.grammar import render_tool_call
from serve_app.schemas import ApiError, ChatMessage, Tool

TOOLS_PREAMBLE = ("You can call these functions. To call one, write a python block holding "
                  '{"name": <function>, "arguments": <object>}; its result comes back as the '
                  'block\'s output.')


def message_chars(m: ChatMessage) -> int:
    """Characters of a message: its text and its tool calls' names and arguments (the max_chars limit)."""
    content = m.content or ""
    text = len(content) if isinstance(content, str) else sum(len(p.text) for p in content)
    return text + sum(len(c.function.name) + len(c.function.arguments) for c in m.tool_calls or [])


def to_conversation(messages: list[ChatMessage], tools: list[Tool] | None) -> list[dict]:
    """OpenAI messages -> nanochat's conversation (tokenizer._render), mapping function calling onto
    the tool tokens:
    - `tools` are listed in the system message (one JSON line per function after TOOLS_PREAMBLE);
    - an assistant's tool call is a python part holding `{"name":...,"arguments":{...}}` (compact
      JSON, as the grammar makes the model write it); a `role: "tool"` message is a python_output
      part holding its content;
    - an assistant message, its tool results and the assistant messages after them form one
      assistant turn (the model's own python tool works the same way), so a conversation that
      ends with tool results ends with an open assistant turn the model continues."""
    out: list[dict] = []
    open_calls: dict[str, str] = {}  # call id -> function name, not yet answered
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        where = f"messages[{i}]"
        if role == "system" and i != 0:
            raise ApiError(400, f"{where}: a system message may only come first", "invalid_value", "messages")
        content: Any = m.content
        if isinstance(content, list):
            if role != "assistant" and any(p.type != "text" for p in content):
                raise ApiError(400, f"{where}: only assistant messages may hold python parts",
                               "invalid_value", "messages")
            content = ("".join(p.text for p in content) if role != "assistant"
                       else [{"type": p.type, "text": p.text} for p in content])
        if role in ("system", "user"):
            out.append({"role": role, "content": content})
            continue
        if role == "tool":
            if not out or out[-1]["role"] != "assistant" or m.tool_call_id not in open_calls:
                raise ApiError(400, f"{where}: tool_call_id {m.tool_call_id!r} answers no earlier assistant "
                               "tool call (a tool message must follow the assistant message that made the "
                               "call)", "invalid_value", "messages")
            del open_calls[m.tool_call_id]
            parts = [{"type": "python_output", "text": content}]
        else:
            parts = ([{"type": "text", "text": content}] if isinstance(content, str) and content
                     else list(content or []))
            for call in m.tool_calls or []:
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError as e:
                    raise ApiError(400,
                                   f"{where}: tool call {call.id!r} has arguments that are not JSON: {e}",
                                   "invalid_value", "messages") from None
                parts.append({"type": "python", "text": render_tool_call(call.function.name, arguments)})
                open_calls[call.id] = call.function.name
        if out and out[-1]["role"] == "assistant":
            out[-1]["content"].extend(parts)  # the same turn goes on
        else:
            out.append({"role": "assistant", "content": parts})
    if tools:
        listing = "\n".join(json.dumps({"name": t.function.name, "description": t.function.description or "",
                                        "parameters": t.function.parameters or {}}, ensure_ascii=False)
                            for t in tools)
        preamble = f"{TOOLS_PREAMBLE}\n{listing}"
        if out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{preamble}"
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out
