"""Chat with a trained model in the terminal: streams the answer as it is generated, keeps the
conversation across turns, and runs the model's Python tool calls in the sandbox, showing them.

    python -m jobs.chat --run demo --stage sft                      # interactive
    python -m jobs.chat --run demo --stage sft -p "What is 7*6?"    # one answer, then exit

Interactive commands: `clear` starts a new conversation, `quit`/`exit` or Ctrl-D ends. Tool calls
appear inline as `[python] <code>` and `[output] <result>` (dimmed and coloured on a terminal;
NO_COLOR turns colour off). Runs on this machine without Ray: it reads the model exported by
the stage, `{storage}/{run}/{stage}/model/`, and the tokenizer saved with it (else
`{storage}/{run}/tokenizer/`); object-store storage (s3://, gs://) is downloaded first.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TextIO

import torch

from cluster.artifacts import exists, find_model, load_tokenizer, localize, stage_model_uri
from cluster.storage import RunStorage, StorageError
from nanochat.checkpoint import CONFIG_FILE, load_model
from nanochat.engine import Engine, ToolUse
from nanochat.errors import NanochatError, entrypoint
from nanochat.sampling import IncrementalDecoder, SamplingParams
from nanochat.sandbox import Sandbox, format_tool_output
from nanochat.tokenizer import Tokenizer

CHAT_STAGES = ("pretrain", "midtrain", "sft", "rl")
_STYLE = {"python": "\033[2;36m", "output": "\033[2;33m", "reset": "\033[0m"}  # dim cyan / dim yellow


class ChatError(NanochatError, RuntimeError):
    """Something the user has to fix before chatting (missing checkpoint, bad storage)."""


class SandboxTool:
    """The engine's Python tool: one Sandbox, created on the first call; its protections are
    reported on `log` then (or why there is no sandbox, which the model then reads as output)."""

    def __init__(self, log: TextIO) -> None:
        self.log = log
        self._sandbox: Sandbox | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()

    def __call__(self, code: str) -> str:
        with self._lock:
            if self._sandbox is None and self._failure is None:
                try:
                    self._sandbox = Sandbox()
                    self.log.write(f"[{self._sandbox.capabilities.summary()}]\n")
                except (RuntimeError, OSError) as e:
                    self._failure = f"sandbox unavailable: {e}"
                    self.log.write(f"[{self._failure}]\n")
                self.log.flush()
        if self._sandbox is None:
            return self._failure or "sandbox unavailable"
        return format_tool_output(self._sandbox.run(code))


def token_bytes_of(tokenizer: Tokenizer) -> Callable[[int], bytes]:
    """token id -> its bytes; a special token (one the model should not print) -> its name."""
    core = tokenizer.core

    def token_bytes(token: int) -> bytes:
        return core.id_to_bytes(token) if token < core.vocab_size else tokenizer.id_to_token(token).encode()

    return token_bytes


class ChatSession:
    """One conversation: renders it for the model, streams each answer to `out`, remembers it."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, params: SamplingParams, out: TextIO,
                 color: bool = False) -> None:
        self.engine, self.tokenizer, self.out, self.color = engine, tokenizer, out, color
        sp = tokenizer.encode_special
        self.assistant_end = sp("<|assistant_end|>")
        self.params = replace(params, stop_token_ids=(self.assistant_end, sp("<|bos|>")))
        self.markers = {sp("<|python_start|>"): "python", sp("<|output_start|>"): "output"}
        self.closers = {sp("<|python_end|>"), sp("<|output_end|>")}
        self.token_bytes = token_bytes_of(tokenizer)
        self.messages: list[dict[str, Any]] = []

    def clear(self) -> None:
        self.messages = []

    def respond(self, text: str) -> dict[str, Any]:
        """Add the user's message, stream the answer to `out`, add and return the assistant message.
        Raises ChatError (the conversation stays as it was) when it no longer fits the context."""
        conversation = {"messages": [*self.messages, {"role": "user", "content": text}]}
        prompt = self.tokenizer.render_for_completion(conversation)
        if len(prompt) >= self.engine.max_seq_len:
            raise ChatError(f"the conversation is {len(prompt)} tokens, the model's context is "
                             f"{self.engine.max_seq_len}: type 'clear' to start a new one")
        parts: list[tuple[str, list[int]]] = [("text", [])]  # (kind, token ids) segments
        decoder = IncrementalDecoder(self.token_bytes)
        for _, step in self.engine.stream([prompt], self.params):
            token = step.token
            if token in self.params.stop_token_ids and not step.forced:
                continue  # the last token of the answer
            if token in self.markers:
                self._write(decoder.flush(), parts[-1][0])
                kind = self.markers[token]
                parts.append((kind, []))
                self._write(f"[{kind}] ", kind)
            elif token in self.closers:
                self._write(decoder.flush(), parts[-1][0])
                self._write("\n")
                parts.append(("text", []))
            else:
                parts[-1][1].append(token)
                self._write(decoder.push(token), parts[-1][0])
        self._write(decoder.flush(), parts[-1][0])
        self.out.flush()
        message = {"role": "assistant", "content": self._content(parts)}
        self.messages = [*conversation["messages"], message]
        return message

    def _content(self, parts: list[tuple[str, list[int]]]) -> str | list[dict[str, str]]:
        """A plain string when the answer is only text, else the parts the tokenizer renders."""
        names = {"text": "text", "python": "python", "output": "python_output"}
        rendered = [{"type": names[k], "text": self.tokenizer.decode(ids)} for k, ids in parts
                    if ids or k != "text"]
        if all(p["type"] == "text" for p in rendered):
            return "".join(p["text"] for p in rendered)
        return rendered

    def _write(self, text: str, kind: str = "text") -> None:
        if not text:
            return
        if self.color and kind in _STYLE:
            text = f"{_STYLE[kind]}{text}{_STYLE['reset']}"
        self.out.write(text)
        self.out.flush()


def pick_device(device: str) -> str:
    """'auto' -> cuda, then mps, then cpu; anything else as given."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_chat_model(run: str, stage: str, storage_uri: str | None, device: str) -> tuple[Any, Tokenizer]:
    """The stage's exported model on `device` and its tokenizer; ChatError names what to run when
    either is missing."""
    storage = RunStorage(run, storage_uri)
    model_uri = stage_model_uri(storage, stage)
    if not storage.is_complete(stage) or not exists(f"{model_uri}/{CONFIG_FILE}"):
        raise ChatError(
            f"run {run!r} has no {stage} model at {model_uri}: run the {stage} stage "
            f"first (python -m jobs.{stage} --run {run}, or python -m jobs.pipeline --run {run}), "
            f"or chat with a stage that has finished (--stage {'/'.join(CHAT_STAGES)})"
        )
    try:
        ref = find_model(storage, stage)
    except StorageError:  # the model is there: only the run's tokenizer can be missing
        raise ChatError(f"run {run!r} has no tokenizer at {storage.stage_uri('tokenizer')}: run the "
                        f"tokenizer stage first (python -m jobs.tokenizer --run {run})") from None
    model, _ = load_model(localize(ref.model), device)
    tokenizer = load_tokenizer(ref.tokenizer)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ChatError(f"the tokenizer at {ref.tokenizer} has {tokenizer.vocab_size} tokens but the {stage} "
                        f"model expects {model.config.vocab_size}: they come from different runs")
    return model, tokenizer


def build_session(model: Any, tokenizer: Tokenizer, args: argparse.Namespace, out: TextIO,
                  log: TextIO) -> ChatSession:
    """An Engine with the sandbox as its Python tool, wrapped in a ChatSession."""
    sp = tokenizer.encode_special
    tool = ToolUse(run=SandboxTool(log), encode=tokenizer.encode, decode=tokenizer.decode,
                   python_start=sp("<|python_start|>"), python_end=sp("<|python_end|>"),
                   output_start=sp("<|output_start|>"), output_end=sp("<|output_end|>"), max_workers=1)
    engine = Engine(model, max_batch_size=1, tool_use=tool)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            seed=args.seed)
    color = out.isatty() and "NO_COLOR" not in os.environ
    return ChatSession(engine, tokenizer, params, out, color=color)


def interact(session: ChatSession, stdin: TextIO, out: TextIO) -> None:
    """Read user lines until EOF or quit; `clear` resets the conversation."""
    out.write("nanochat: type a message; 'clear' starts over, 'quit' or Ctrl-D ends.\n")
    while True:
        out.write("\nUser: ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return
        text = line.strip()
        if text in ("quit", "exit"):
            return
        if text == "clear":
            session.clear()
            out.write("(new conversation)\n")
            continue
        if not text:
            continue
        out.write("Assistant: ")
        try:
            session.respond(text)
        except ChatError as e:
            out.write(f"\n[{e}]")
        out.write("\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run id (directory under the storage)")
    p.add_argument("--stage", default="sft", choices=CHAT_STAGES, help="whose exported model to load")
    p.add_argument("--storage", default=None,
                   help="run storage: local dir, s3:// or gs:// (default $NANOCHAT_HOME/runs)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="most tokens per answer (tool output included)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: fresh each answer)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    return p.parse_args(argv)


@entrypoint
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k)
    except ValueError as e:  # the engine's own check of the sampling flags
        raise ChatError(str(e)) from None
    model, tokenizer = load_chat_model(args.run, args.stage, args.storage, pick_device(args.device))
    session = build_session(model, tokenizer, args, sys.stdout, sys.stderr)
    try:
        if args.prompt is None:
            interact(session, sys.stdin, sys.stdout)
            return 0
        session.respond(args.prompt)
        sys.stdout.write("\n")
        return 0
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    finally:
        session.engine.close()


if __name__ == "__main__":
    sys.exit(main())
