"""Shared pieces of every evaluation (base CORE now, chat evaluations later), free of Ray.

- the evaluation sets of the embedded pack: `load_pack_items(task, split)` reads
  {home}/data/eval/<task>/<split>.jsonl (built by `python -m jobs.data`; fields in jobs/datapack.py);
- `EvalState`: what an evaluation worker holds once (model, tokenizer, device, context length),
  built by `load_eval_state` from a saved checkpoint and tokenizer;
- sharding and aggregation: items are split with `shard_items`; each item gives one `ItemResult`
  whose score depends only on the model and the item, and `aggregate` sums them in (task, index)
  order, so N shards give exactly the totals of 1 shard;
- centring: `centred_mean` is CORE's and ChatCORE's mean of (acc - baseline) / (1 - baseline);
- validation bits per byte over the validation shard, whole or one of `parts` interleaved parts
  (`val_bpb`, via nanochat.train.bpb_sums; `combine_bpb` adds the parts' nats and bytes), and
  greedy completions of fixed prompts (`sample_completions`, via nanochat.engine).

Nothing here runs at import time. Tests: `python -m pytest tests/test_core_eval.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from nanochat.common import DistInfo
from nanochat.data.dataset import iter_documents, nanochat_home
from nanochat.errors import ConfigError, NotFoundError

T = TypeVar("T")

# Fixed prompts for greedy samples of a base model: facts, a little arithmetic, and openings in the
# style of the embedded pack (Shakespeare scenes, the Python manual), so even a tiny model has
# something to continue.
SAMPLE_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Water freezes at a temperature of",
    "Three plus four equals",
    "HAMLET. To be, or not to be,",
    "Enter the King and Queen, with attendants.",
    "In Python, a dictionary maps",
    "def fibonacci(n):",
)


def eval_data_dir() -> Path:
    """Where the pack's evaluation sets live: {home}/data/eval."""
    return nanochat_home() / "data" / "eval"


def pack_tasks_available(eval_dir: str | Path | None = None) -> dict[str, list[str]]:
    """{task: [splits]} present on disk under eval_dir."""
    root = Path(eval_dir) if eval_dir is not None else eval_data_dir()
    if not root.is_dir():
        return {}
    return {d.name: sorted(p.stem for p in d.glob("*.jsonl")) for d in sorted(root.iterdir()) if d.is_dir()}


def load_pack_items(task: str, split: str, eval_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of one evaluation set of the pack, in file order."""
    root = Path(eval_dir) if eval_dir is not None else eval_data_dir()
    path = root / task / f"{split}.jsonl"
    if not path.is_file():
        available = pack_tasks_available(root)
        if not available:
            raise NotFoundError(
                f"no evaluation sets under {root}: build them with `python -m jobs.data --source embedded`"
            )
        if task not in available:
            raise ConfigError(f"unknown evaluation task {task!r}; the pack at {root} has {sorted(available)}")
        raise ConfigError(f"task {task!r} has no split {split!r} at {root}; it has {available[task]}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{n} is not valid JSON ({e}); rebuild with `python -m jobs.data --force`") from e
    return rows


# ----------------------------------------------------------------------------- what a worker holds


@dataclass
class EvalState:
    """A model ready for evaluation, held by one evaluation worker."""

    model: Any  # forward(idx (B, T)) -> logits (B, T, V); `config` like GPTConfig for the engine
    tokenizer: Any  # nanochat.tokenizer.Tokenizer or anything with encode/decode/get_bos_token_id
    device: str  # torch device string
    max_seq_len: int | None  # longer inputs keep their last max_seq_len tokens; None: no limit
    meta: dict[str, Any] | None = None  # the checkpoint's meta (step, config), when known


def load_eval_state(model_dir: str | Path, tokenizer_dir: str | Path | None, device: str) -> EvalState:
    """Load an exported model (nanochat.checkpoint) and its tokenizer onto `device`, in eval mode.

    tokenizer_dir None: the tokenizer exported beside the weights (model_dir/tokenizer). The context
    limit is the model's training sequence length: it never saw later positions. On CPU the model's
    linear layers take their prepacked-weight path (GPT.set_cpu_prepack), as in the engine."""
    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import Tokenizer

    model, meta = load_model(model_dir, device)
    tokenizer_dir = tokenizer_dir or meta.get("tokenizer_dir")
    if tokenizer_dir is None:
        raise NotFoundError(f"the model at {model_dir} has no tokenizer/ beside it and none was given")
    tokenizer = Tokenizer.load(tokenizer_dir)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"the model at {model_dir} has vocab {model.config.vocab_size} "
            f"but the tokenizer at {tokenizer_dir} "
            f"has {tokenizer.vocab_size}: they come from different runs"
        )
    if device == "cpu":  # the inference fast path of the linear layers (as the engine uses it)
        model.set_cpu_prepack(True)
    return EvalState(model, tokenizer, device, model.config.sequence_len, meta)


# ----------------------------------------------------------------------------- sharding and totals


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one evaluated item."""

    task: str
    index: int  # the item's index in its task
    score: float  # credit in [0, 1] (accuracy when averaged)
    seconds: float = 0.0  # time spent on it (not part of any total that must match)


@dataclass(frozen=True)
class TaskTotals:
    """Summed results of one task."""

    task: str
    score_sum: float
    count: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.score_sum / self.count if self.count else float("nan")


def shard_items(items: Sequence[T], num_shards: int) -> list[list[T]]:
    """Contiguous, near-equal shards in order (sizes differ by at most one); none are empty
    unless there are fewer items than shards, and concatenating them gives `items` back."""
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(len(items), num_shards)
    shards, start = [], 0
    for k in range(num_shards):
        stop = start + base + (1 if k < extra else 0)
        shards.append(list(items[start:stop]))
        start = stop
    return shards


def aggregate(results: Iterable[ItemResult]) -> dict[str, TaskTotals]:
    """Totals per task, summed in (task, index) order so any sharding gives identical floats.

    The same (task, index) twice means an item was evaluated twice: an error."""
    ordered = sorted(results, key=lambda r: (r.task, r.index))
    totals: dict[str, TaskTotals] = {}
    seen: set[tuple[str, int]] = set()
    for r in ordered:
        if (r.task, r.index) in seen:
            raise ValueError(f"item {r.index} of task {r.task!r} was evaluated twice: shards overlap")
        seen.add((r.task, r.index))
        t = totals.get(r.task, TaskTotals(r.task, 0.0, 0, 0.0))
        totals[r.task] = TaskTotals(r.task, t.score_sum + r.score, t.count + 1, t.seconds + r.seconds)
    return totals


def centred_mean(accuracies: dict[str, float], baselines: dict[str, float]) -> tuple[dict[str, float], float]:
    """({task: (acc - b) / (1 - b)}, their mean): CORE over base tasks, ChatCORE over chat tasks."""
    if not accuracies:
        raise ValueError("no task results to average")
    missing = sorted(set(accuracies) - set(baselines))
    if missing:
        raise ValueError(f"no random baseline for task(s) {missing}")
    centred = {t: (a - baselines[t]) / (1.0 - baselines[t]) for t, a in accuracies.items()}
    return centred, sum(centred.values()) / len(centred)


# ----------------------------------------------------------------------------- bpb and samples



def _encoded(docs: Iterable[str], tokenizer: Any, bos: int, group: int) -> Iterator[list[int]]:
    """Token ids of each document with BOS first, encoded `group` documents at a time."""
    pending: list[str] = []
    for doc in docs:
        pending.append(doc)
        if len(pending) == group:
            yield from tokenizer.encode(pending, prepend=bos)
            pending = []
    if pending:
        yield from tokenizer.encode(pending, prepend=bos)


def val_batches(docs: Iterable[str], tokenizer: Any, batch_size: int, seq_len: int,
                max_tokens: int | None = None,
                encode_group: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of (batch_size, seq_len) from documents, each starting with BOS, concatenated.

    Consecutive batches overlap by one token (each target is predicted once); the last batch is
    padded with BOS inputs and -1 targets (ignored). Stops after max_tokens targets."""
    bos = tokenizer.get_bos_token_id()
    need = batch_size * seq_len + 1  # inputs and targets of one batch, shifted by one
    buffer: list[int] = []
    emitted = 0

    def batch(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.tensor(tokens, dtype=torch.long)
        x = torch.full((need - 1,), bos, dtype=torch.long)
        y = torch.full((need - 1,), -1, dtype=torch.long)
        x[: len(chunk) - 1], y[: len(chunk) - 1] = chunk[:-1], chunk[1:]
        return x.view(batch_size, seq_len), y.view(batch_size, seq_len)

    for ids in _encoded(docs, tokenizer, bos, encode_group):
        buffer.extend(ids)
        while len(buffer) >= need:
            yield batch(buffer[:need])
            emitted += need - 1
            buffer = buffer[need - 1:]
            if max_tokens is not None and emitted >= max_tokens:
                return
    if len(buffer) > 1:
        yield batch(buffer)


def val_bpb(state: EvalState, shards: Sequence[str], max_tokens: int, batch_size: int,
            part: int = 0, parts: int = 1) -> dict[str, float]:
    """Bits per byte of the model on the documents of `shards` (at most max_tokens targets), the
    documents concatenated into one BOS-separated stream at the model's context. Stored as
    `eval_bpb` in evaluate/<stage>.json (nanochat/report.py's `evaluation_bpb` reads it); training's
    `val_bpb` is another number: rows packed from BOS-led documents, eval_tokens of them
    (nanochat/data/dataloader.py).

    With `parts` > 1 only the stream's batches number part, part + parts, ... are run (every part
    reads and tokenizes the same stream): `combine_bpb` of all parts' results is the whole's bpb.
    The result carries the sums: {"bpb", "nats", "bytes", "tokens"}."""
    from nanochat.train import bpb_from_sums, bpb_sums

    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: need 0 <= part < parts")
    seq_len = state.max_seq_len or state.model.config.sequence_len
    batches = val_batches(iter_documents(shards), state.tokenizer, batch_size, seq_len, max_tokens)
    counted = [0]

    def counting() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(batches):
            if i % parts == part:
                counted[0] += int((y >= 0).sum())
                yield x, y

    nats, nbytes = bpb_sums(state.model, counting(), state.tokenizer.token_bytes(),
                            DistInfo(device=state.device))
    return {"bpb": bpb_from_sums(nats, nbytes), "nats": nats, "bytes": nbytes, "tokens": counted[0]}


def combine_bpb(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The bpb of a stream from its parts' `val_bpb` results (their sums added)."""
    from nanochat.train import bpb_from_sums

    nats, nbytes = sum(p["nats"] for p in parts), int(sum(p["bytes"] for p in parts))
    return {"bpb": bpb_from_sums(nats, nbytes), "nats": nats, "bytes": nbytes,
            "tokens": int(sum(p["tokens"] for p in parts))}


def sample_completions(state: EvalState, prompts: Sequence[str], max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy completions of each prompt (stopping at BOS, i.e. the end of a document)."""
    from nanochat.engine import Engine, SamplingParams

    bos = state.tokenizer.get_bos_token_id()
    ids = [state.tokenizer.encode(p, prepend=bos) for p in prompts]
    engine = Engine(state.model, max_batch_size=max(1, len(ids)))
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(bos,))
        generations = engine.generate(ids, params)
    finally:
        engine.close()
    out = []
    for prompt, gen in zip(prompts, generations, strict=True):
        tokens = [t for t in gen.tokens if t != bos]
        out.append({"prompt": prompt, "completion": state.tokenizer.decode(tokens)})
    return out
