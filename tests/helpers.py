"""Plain helpers shared by the test modules (fixtures live in tests/conftest.py).

- `tiny_gpt` / `random_gpt`: small GPTs on CPU, seeded, with nanochat's init or every weight random;
- `ByteTokenizer`: UTF-8 bytes as token ids and BOS = 256, for code that needs only encode/decode;
- `hi`: the `messages` of a one-turn chat request;
- `wait_for`: wait (polling, with a deadline) for something another thread or process does.

Import them as `from tests.helpers import ...` (the repository root is on sys.path when pytest runs).
"""

from __future__ import annotations

import torch

from nanochat.gpt import GPT, GPTConfig


def tiny_gpt(config: GPTConfig, seed: int = 0, *, init: bool = True, lm_head_std: float | None = None) -> GPT:
    """GPT(config) built right after torch.manual_seed(seed).

    init: nanochat's init_weights (the output projections and lm_head are zero, so the logits are
    uniform); init=False keeps torch's default init (random everywhere). lm_head_std: then redraw the
    lm_head from N(0, lm_head_std), a model with an opinion that training can change."""
    torch.manual_seed(seed)
    model = GPT(config)
    if init:
        model.init_weights()
    if lm_head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0, lm_head_std)
    return model


def random_gpt(config: GPTConfig, seed: int = 0, std: float = 0.2) -> GPT:
    """tiny_gpt with every parameter redrawn from N(0, std), in eval mode: informative logits (with
    nanochat's init alone all logits are 0 and tests of cached vs recomputed logits pass trivially)."""
    model = tiny_gpt(config, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and BOS = 256, no merges and no training: the part of the tokenizer
    interface the data loader and the evaluation harness call (a str gives a list of ids, a list or a
    pyarrow array of str gives a list of lists)."""

    BOS = 256

    def get_bos_token_id(self) -> int:
        return self.BOS

    def encode(self, text, prepend=None, append=None, num_threads=None):
        if isinstance(text, str):
            ids = list(text.encode("utf-8"))
            return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])
        texts = text.to_pylist() if hasattr(text, "to_pylist") else list(text)
        return [self.encode(t, prepend, append) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """Bytes per token id: 1 for each byte, 0 for BOS (left out of bits per byte)."""
        return torch.tensor([1] * 256 + [0])


def hi(text: str = "hello there") -> list[dict]:
    """The `messages` of a chat request: one user turn saying `text`."""
    return [{"role": "user", "content": text}]


def wait_for(predicate, timeout_s: float, what: str, proc=None, interval: float = 0.1) -> None:
    """Poll `predicate()` every `interval` s until it is true; an AssertionError naming `what` after
    `timeout_s` s, or as soon as `proc` (a subprocess.Popen) has exited (a loaded CI machine can take far
    longer than a fixed sleep allows, and a fixed sleep makes every run wait)."""
    import time

    deadline = time.time() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval)


def pid_and(state, value):
    """An evaluation job for pool tests (in an importable module, as Ray pickles functions by reference):
    (this actor's pid, value, when the call started), after 0.2 s."""
    import os
    import time

    started = time.time()
    time.sleep(0.2)
    return (os.getpid(), value, started)


def pid_chunk(state, chunk):
    """pid_and over a chunk of values."""
    return [pid_and(state, v) for v in chunk]


def fail_job(state, what):
    """An evaluation job that fails, naming `what`."""
    raise ValueError(f"broken {what}")


def short_chunk(state, chunk):
    """A chunk function that loses its last item's result."""
    return list(chunk)[:-1]
