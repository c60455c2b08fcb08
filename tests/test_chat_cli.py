"""Tests for the chat CLI (jobs/chat.py): one-shot and multi-turn through a subprocess, and the
session logic in process.

Run: PYTHONPATH=. python -m pytest tests/test_chat_cli.py -q
The model is a real GPT whose weights make it a scripted bigram machine: its blocks' output
projections are zero (init_weights), so the logits depend on the last token only; the embedding
is one-hot and lm_head maps each scripted token to its successor. After <|assistant_start|> it
writes "Hié " (é as two byte tokens, so streaming must hold back half a character), calls the
tool with `6*7`, reads the forced output and ends with "!". The tokenizer has bytes and the
special tokens only (vocab 265), saved as a run in a temporary storage.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jobs.chat import ChatSession, build_session, interact, parse_args
from nanochat.checkpoint import save_model
from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import dense_mask
from nanochat.tokenizer import Tokenizer

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parent.parent
RUN = "chatrun"
SEQ_LEN = 48  # a turn adds 25 tokens to the conversation (8 user + 17 assistant): the third does not fit
ANSWER = "Hié [python] 6*7\n[output] 42\n!"


def scripted_gpt(tokenizer: Tokenizer) -> GPT:
    """A GPT that answers ANSWER (see the module docstring); unscripted tokens lead to the end."""
    sp = tokenizer.encode_special
    vocab = tokenizer.vocab_size
    b = lambda text: list(text.encode())  # noqa: E731 - byte ids of a text
    chain = [sp("<|assistant_start|>"), *b("Hi\u00e9 "), sp("<|python_start|>"), *b("6*7"), sp("<|python_end|>")]
    script = dict(zip(chain, chain[1:], strict=False))
    script[sp("<|output_end|>")] = ord("!")
    script[ord("!")] = sp("<|assistant_end|>")
    assert len(set(chain + [ord("!")])) == len(chain) + 1  # no token repeats: one successor each
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=272)
    model = GPT(config)
    model.init_weights()  # zero output projections: logits depend on the last token only
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.eye(vocab, config.n_embd))
        model.lm_head.weight.zero_()
        model.lm_head.weight[sp("<|assistant_end|>"), :vocab] = 1.0
        for current, following in script.items():
            model.lm_head.weight[following, current] = 10.0
    return model.eval()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory, byte_tok: Tokenizer) -> Path:
    root = tmp_path_factory.mktemp("runs")
    byte_tok.save(root / RUN / "tokenizer")
    save_model(root / RUN / "sft" / "model", scripted_gpt(byte_tok), {"step": 0})
    for stage in ("tokenizer", "sft"):  # stand-ins of complete stages: meta.json is their completion marker
        (root / RUN / stage / "meta.json").write_text(json.dumps({"stage": stage, "stand_in": True}))
    return root


def chat(storage: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "jobs.chat", "--run", RUN, "--storage", str(storage), "--temperature", "0", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, cwd=ROOT, timeout=150)


# ---- through the real command line ---------------------------------------------------------------


def test_one_shot_streams_the_answer_with_tool_call(storage: Path) -> None:
    done = chat(storage, "-p", "hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ANSWER + "\n"
    assert "sandbox mode=" in done.stderr  # the protections are reported when the tool first runs


def test_multi_turn_keeps_the_conversation_until_clear(storage: Path) -> None:
    done = chat(storage, stdin="hello\nhello\nhello\nclear\nhello\n")
    assert done.returncode == 0, done.stderr
    turns = done.stdout.split("User: ")[1:]
    assert [t.startswith("Assistant: ") for t in turns] == [True, True, True, False, True, False]
    assert turns[0] == turns[1] == f"Assistant: {ANSWER}\n\n"
    assert "the conversation is 57 tokens" in turns[2]  # two kept turns + this one overflow 48
    assert turns[3] == "(new conversation)\n\n"
    assert turns[4] == turns[0]
    assert turns[5] == "\n"  # EOF ends the session


def test_missing_stage_names_the_stage_to_run(storage: Path, tmp_path: Path) -> None:
    done = chat(storage, "--stage", "rl", "-p", "hello")
    assert done.returncode == 2
    assert "has no rl model" in done.stderr and "python -m jobs.rl --run chatrun" in done.stderr
    assert done.stdout == ""
    empty = chat(tmp_path, "-p", "hello")
    assert empty.returncode == 2 and "has no sft model" in empty.stderr


def test_bad_sampling_arguments_are_refused(storage: Path) -> None:
    done = chat(storage, "--temperature", "-1", "-p", "hi")
    assert done.returncode == 2 and "temperature must be >= 0" in done.stderr


# ---- in process: the session ------------------------------------------------------------------------


class Recorder(io.StringIO):
    """Keeps every write separately, to check that none splits a character."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def session_for(model, tokenizer: Tokenizer, out: io.StringIO) -> ChatSession:
    args = parse_args(["--run", RUN, "--temperature", "0", "--max-tokens", "40"])
    return build_session(model, tokenizer, args, out, io.StringIO())


def test_session_records_tool_parts_and_never_splits_characters(byte_tok: Tokenizer) -> None:
    out = Recorder()
    session = session_for(scripted_gpt(byte_tok), byte_tok, out)
    message = session.respond("hello")
    assert out.getvalue() == ANSWER
    assert "\ufffd" not in "".join(out.writes) and "é" in out.writes  # é arrives whole, in one write
    assert message["content"] == [
        {"type": "text", "text": "Hié "}, {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"}, {"type": "text", "text": "!"},
    ]
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    ids, mask = byte_tok.render_conversation({"messages": session.messages})
    assert byte_tok.decode(ids).endswith("<|output_start|>42<|output_end|>!<|assistant_end|>")


class TurnCounter:
    """A mock model that answers with the number of user turns it sees in the prompt, then ends.
    It reads the whole prefix back from the KV cache (token ids stored as keys), so its answer
    shows what the session sent."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.user_start = tokenizer.encode_special("<|user_start|>")
        self.end = tokenizer.encode_special("<|assistant_end|>")
        self.assistant_start = tokenizer.encode_special("<|assistant_start|>")
        self.config = SimpleNamespace(n_layer=1, n_head=1, n_kv_head=1, n_embd=1, sequence_len=256,
                                      vocab_size=tokenizer.vocab_size)

    def __call__(self, idx: torch.Tensor, kv_cache) -> torch.Tensor:
        x = idx.to(torch.float32)[:, None, :, None]
        _, values, mask = kv_cache.insert_kv(0, x, x)  # values (B, 1, T_keys, 1)
        mask = dense_mask(mask, values, idx.size(1))  # None = every key visible
        logits = torch.zeros(idx.size(0), idx.size(1), self.config.vocab_size)
        for b in range(idx.size(0)):
            for t in range(idx.size(1)):
                prefix = values[b, 0, mask[b, 0, t], 0].long().tolist()
                if self.assistant_start in prefix:  # answer the digit right after it, then end
                    answered = prefix[-1] != self.assistant_start
                    logits[b, t, self.end if answered else ord("0") + prefix.count(self.user_start)] = 50.0
        return logits


def test_session_sends_the_whole_conversation(byte_tok: Tokenizer) -> None:
    out = io.StringIO()
    session = ChatSession(Engine(TurnCounter(byte_tok), max_batch_size=1), byte_tok,
                          SamplingParams(temperature=0, max_new_tokens=8), out)
    assert [session.respond("a")["content"] for _ in range(3)] == ["1", "2", "3"]
    session.clear()
    assert session.respond("a")["content"] == "1"


def test_interact_reports_overflow_and_continues(byte_tok: Tokenizer) -> None:
    out = io.StringIO()
    session = session_for(scripted_gpt(byte_tok), byte_tok, out)
    interact(session, io.StringIO("hi\n" + "x" * 60 + "\nquit\nhi\n"), out)
    text = out.getvalue()
    assert text.count(ANSWER) == 1 and "context is 48: type 'clear'" in text
    assert text.rstrip().endswith("User:")  # stopped at quit: the last "hi" was never read
