"""CORE (DCLM, arXiv 2406.11794): few-shot in-context evaluation of a base model, as nanochat runs it.

A task is a list of items in the DCLM bundle's format plus a `TaskMeta`:
- multiple_choice: {"query", "choices", "gold"}: one context, several continuations; the model
  picks the choice with the lowest mean loss per continuation token;
- schema: {"context_options", "continuation", "gold"}: several contexts, one continuation (e.g.
  winogrande); the context under which the shared continuation is most likely wins;
- language_modeling: {"context", "continuation"}: correct when greedy (argmax) decoding
  reproduces every token of the continuation.

Notable:
- prompts are rendered as `[example + "\\n\\n"] * k + item`, the example/item joined to its answer by
  the task's continuation delimiter; the k few-shot examples are drawn (seed 1234 + item index)
  from the task's other items, as nanochat does;
- the scored span is found in token space: the common token prefix of the choice prompts (MC), the
  common suffix (schema), or where the prompt without the continuation ends (LM); sequences longer
  than the model's context keep their last `max_seq_len` tokens;
- ties (a model with uniform logits; mean losses equal to a relative 1e-6) give fractional credit,
  1/(number of tied choices) if the gold one is among them: the expected accuracy of random
  tie-breaking, so a uniform model scores exactly chance. Real models practically never tie,
  where this is DCLM's argmin;
- accuracy is centred by the task's random baseline, (acc - b) / (1 - b), and CORE is the mean
  of the centred accuracies; a random model scores about 0, a perfect one 1;
- the real bundle (`eval_bundle.zip`, 22 tasks) loads from disk, or is downloaded once; offline the
  download fails within a few seconds, and callers use the pack tasks of nanochat/evals/core_tasks.py.

Items are turned into `CoreRequest`s (rendered prompts) in the driver and scored anywhere
(`score_requests` runs in the evaluation actors of cluster/eval_pool.py); each request's score
depends only on the model and the request, so sharding never changes a result.
Tests: `python -m pytest tests/test_core_eval.py`.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml

from nanochat.common import autocast_context
from nanochat.data.dataset import DownloadError, SourceUnavailableError, check_reachable
from nanochat.engine import takes_logits_at
from nanochat.errors import ConfigError, NotFoundError
from nanochat.evals.harness import EvalState, ItemResult, TaskTotals, centred_mean

TaskType = Literal["multiple_choice", "schema", "language_modeling"]
TASK_TYPES: tuple[str, ...] = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # few-shot examples of item i come from random.Random(1234 + i), as in nanochat
SELECT_SEED = 1337  # a capped task evaluates the first max_items of a shuffle with this seed (nanochat's)
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


@dataclass(frozen=True)
class TaskMeta:
    """How one CORE task is rendered and scored."""

    label: str  # the task's name in results, e.g. "hellaswag_zeroshot"
    task_type: TaskType
    num_fewshot: int  # solved examples put before each item
    continuation_delimiter: str  # text between a context and its answer, e.g. " " or "\nAnswer: "
    random_baseline: float  # accuracy of random guessing, a fraction in [0, 1)

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ConfigError(f"task {self.label!r}: unknown task type {self.task_type!r}; "
                              f"use one of {TASK_TYPES}")
        if self.num_fewshot < 0 or not 0.0 <= self.random_baseline < 1.0:
            raise ConfigError(
                f"task {self.label!r}: num_fewshot must be >= 0 (got {self.num_fewshot}) and the random "
                f"baseline a fraction in [0, 1) (got {self.random_baseline})"
            )


@dataclass
class CoreTask:
    """A task's metadata and all of its items (few-shot examples are drawn from them)."""

    meta: TaskMeta
    items: list[dict[str, Any]]


@dataclass(frozen=True)
class CoreRequest:
    """One item, rendered and ready to score: MC/schema prompts one per option, LM [without, with]."""

    task: str
    index: int  # the item's index in its task's full item list
    task_type: TaskType
    prompts: tuple[str, ...]
    gold: int  # index of the right option; -1 for language modelling


# ----------------------------------------------------------------------------- rendering


def _check_item(item: dict[str, Any], meta: TaskMeta) -> None:
    need = {"multiple_choice": ("query", "choices", "gold"),
            "schema": ("context_options", "continuation", "gold"),
            "language_modeling": ("context", "continuation")}[meta.task_type]
    missing = [k for k in need if k not in item]
    if missing:
        raise ValueError(f"task {meta.label!r}: a {meta.task_type} item lacks {missing} (has {sorted(item)})")


def render_prompts(item: dict[str, Any], meta: TaskMeta, fewshot: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The full prompts of one item: few-shot examples (each followed by a blank line), then the item."""
    _check_item(item, meta)
    delim = meta.continuation_delimiter
    if meta.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if meta.task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n"
                        for ex in fewshot)
        return [f"{shots}{option}{delim}{item['continuation']}" for option in item["context_options"]]
    # language modelling: contexts are trimmed (some datasets carry trailing spaces); the prompt without
    # the continuation is stripped so that its tokens are a clean prefix of the prompt with it
    shots = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{delim}"
    return [without.strip(), f"{without}{item['continuation']}"]


def fewshot_indices(num_items: int, index: int, k: int, seed: int = FEWSHOT_SEED) -> list[int]:
    """k distinct item indices other than `index`, drawn with random.Random(seed + index)."""
    if k == 0:
        return []
    if num_items - 1 < k:
        raise ConfigError(f"{k}-shot needs at least {k + 1} items in the task, it has {num_items}")
    others = [i for i in range(num_items) if i != index]
    return random.Random(seed + index).sample(others, k)


def select_items(num_items: int, max_items: int | None, seed: int = SELECT_SEED) -> list[int]:
    """Indices of the items to evaluate: all (in order), or the first max_items of a seeded shuffle."""
    indices = list(range(num_items))
    if max_items is None or max_items < 0 or max_items >= num_items:
        return indices
    random.Random(seed).shuffle(indices)
    return indices[:max_items]


def build_requests(task: CoreTask, max_items: int | None = None) -> list[CoreRequest]:
    """Render the (capped) items of a task; few-shot examples come from the whole task."""
    meta, items = task.meta, task.items
    if not items:
        raise ConfigError(f"task {meta.label!r} has no items")
    requests = []
    for i in select_items(len(items), max_items):
        shots = [items[j] for j in fewshot_indices(len(items), i, meta.num_fewshot)]
        prompts = render_prompts(items[i], meta, shots)
        gold = int(items[i]["gold"]) if meta.task_type != "language_modeling" else -1
        if meta.task_type != "language_modeling" and not 0 <= gold < len(prompts):
            raise ValueError(f"task {meta.label!r} item {i}: gold {gold} is not an option index "
                             f"(0..{len(prompts) - 1})")
        requests.append(CoreRequest(meta.label, i, meta.task_type, tuple(prompts), gold))
    return requests


# ----------------------------------------------------------------------------- scoring


def common_length(seqs: Sequence[Sequence[int]], direction: Literal["left", "right"]) -> int:
    """Length of the common prefix ("left") or suffix ("right") of token sequences."""
    shortest = min(len(s) for s in seqs)
    for n in range(shortest):
        pos = n if direction == "left" else -1 - n
        if any(s[pos] != seqs[0][pos] for s in seqs[1:]):
            return n
    return shortest


def continuation_spans(tokens: Sequence[Sequence[int]], task_type: TaskType) -> list[tuple[int, int]]:
    """(start, end) token positions of the scored part of each sequence; start >= 1 (BOS first).

    MC: after the common prefix; schema: the common suffix; LM: after the prompt without the
    continuation (tokens[0]), scored on tokens[1] only. Every span keeps at least one token."""
    if task_type == "language_modeling":
        without, with_ = tokens
        start = common_length([without, with_], "left")  # == len(without) unless BPE merged across the seam
        return [(min(start, len(with_) - 1), len(with_))]
    shortest = min(len(t) for t in tokens)
    if task_type == "multiple_choice":  # one start for all options, so they are scored after the same context
        start = max(1, min(common_length(tokens, "left"), shortest - 1))
        return [(start, len(t)) for t in tokens]
    suffix = max(1, min(common_length(tokens, "right"), shortest - 1))  # the same continuation tokens
    return [(len(t) - suffix, len(t)) for t in tokens]


def crop_left(tokens: list[list[int]], spans: list[tuple[int, int]], max_len: int) -> tuple[
        list[list[int]], list[tuple[int, int]]]:
    """Keep the last max_len tokens of long sequences, shifting their spans (start stays >= 1)."""
    out_tokens, out_spans = [], []
    for t, (s, e) in zip(tokens, spans, strict=True):
        cut = max(0, len(t) - max_len)
        out_tokens.append(t[cut:])
        out_spans.append((max(1, s - cut), e - cut))
    return out_tokens, out_spans


TIE_RTOL = 1e-6  # mean losses this close tie: float32 means of n equal losses differ by ulps (~1e-7) with n


def option_credit(mean_losses: Sequence[float], gold: int) -> float:
    """1 if gold has the lowest mean loss; 1/k if it ties (within TIE_RTOL) with k-1 others; else 0."""
    best = min(mean_losses)
    tied = [i for i, loss in enumerate(mean_losses) if loss - best <= TIE_RTOL * max(1.0, abs(best))]
    return 1.0 / len(tied) if gold in tied else 0.0


@torch.no_grad()
def score_request(model: Callable[[torch.Tensor], torch.Tensor], tokenizer: Any, request: CoreRequest,
                  device: str | torch.device = "cpu", max_seq_len: int | None = None) -> float:
    """The credit (0..1) of one request. `model(idx (B, T)) -> logits (B, T, V)`; `tokenizer` has
    encode(list[str], prepend=id) and get_bos_token_id()."""
    bos = tokenizer.get_bos_token_id()
    tokens = [list(t) for t in tokenizer.encode(list(request.prompts), prepend=bos)]
    spans = continuation_spans(tokens, request.task_type)
    if request.task_type == "language_modeling":
        tokens = tokens[1:]  # only the prompt with the continuation is run
    if max_seq_len is not None:
        tokens, spans = crop_left(tokens, spans, max_seq_len)
    width = max(len(t) for t in tokens)
    idx = torch.full((len(tokens), width), bos, dtype=torch.long)  # right-padded with BOS (never scored)
    for row, t in enumerate(tokens):
        idx[row, : len(t)] = torch.tensor(t, dtype=torch.long)
    idx = idx.to(device)
    # position p predicts token p + 1: the scored positions of a row are s - 1 .. e - 2; a model that
    # takes `logits_at` (nanochat's GPT) computes the output layer there only (rows padded with
    # their last position), others give every position's logits
    width = max(e - s for s, e in spans)
    at = torch.tensor([[min(s - 1 + k, e - 2) for k in range(width)] for s, e in spans], device=idx.device)
    with autocast_context(device):
        if takes_logits_at(model):
            logits = model(idx, logits_at=at).float()  # (B, width, V)
        else:
            logits = model(idx).float()[torch.arange(len(spans), device=idx.device)[:, None], at]
    if request.task_type == "language_modeling":
        s, e = spans[0]
        predicted = logits[0, : e - s].argmax(dim=-1)
        return float(torch.equal(predicted, idx[0, s:e]))
    mean_losses = []
    for row, (s, e) in enumerate(spans):
        nll = F.cross_entropy(logits[row, : e - s], idx[row, s:e], reduction="none")  # (e - s,) nats
        mean_losses.append(float(nll.double().mean()))  # float64: equal losses give equal means for any n
    return option_credit(mean_losses, request.gold)


def score_requests(state: EvalState, requests: Sequence[CoreRequest]) -> list[ItemResult]:
    """Score requests one by one on an evaluation state (what each evaluation actor runs)."""
    results = []
    for request in requests:
        t0 = time.perf_counter()
        score = score_request(state.model, state.tokenizer, request, state.device, state.max_seq_len)
        results.append(ItemResult(request.task, request.index, score, time.perf_counter() - t0))
    return results


def core_results(metas: Sequence[TaskMeta], totals: dict[str, TaskTotals]) -> dict[str, Any]:
    """{"metric": mean centred accuracy, "tasks": {label: accuracy, centred, baseline, items, ...}}."""
    missing = [m.label for m in metas if m.label not in totals]
    if missing:
        raise ValueError(f"no results for CORE task(s) {missing}")
    accuracies = {m.label: totals[m.label].accuracy for m in metas}
    centred, metric = centred_mean(accuracies, {m.label: m.random_baseline for m in metas})
    tasks = {
        m.label: {"accuracy": accuracies[m.label], "centered": centred[m.label],
                  "random_baseline": m.random_baseline,
                  "num_items": totals[m.label].count, "num_fewshot": m.num_fewshot, "task_type": m.task_type,
                  "actor_seconds": round(totals[m.label].seconds, 3)}
        for m in metas
    }
    return {"metric": metric, "tasks": tasks}


# ----------------------------------------------------------------------------- the real eval bundle


def load_bundle_tasks(bundle_dir: str | Path, labels: Sequence[str] | None = None) -> list[CoreTask]:
    """The tasks of an unpacked eval bundle (core.yaml, eval_meta_data.csv, eval_data/**.jsonl).

    Random baselines are read from eval_meta_data.csv (percent) and stored as fractions."""
    root = Path(bundle_dir)
    if not (root / "core.yaml").is_file():
        raise NotFoundError(f"no eval bundle at {root}: core.yaml is missing (see ensure_bundle)")
    config = yaml.safe_load((root / "core.yaml").read_text())
    with open(root / "eval_meta_data.csv", newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100.0 for row in csv.DictReader(f)}
    entries = config["icl_tasks"]
    known = [e["label"] for e in entries]
    unknown = sorted(set(labels or ()) - set(known))
    if unknown:
        raise ConfigError(f"unknown CORE task(s) {unknown}: the bundle at {root} has {known}")
    tasks = []
    for entry in entries:
        if labels is not None and entry["label"] not in labels:
            continue
        shots = entry["num_fewshot"]
        meta = TaskMeta(entry["label"], entry["icl_task_type"],
                        int(shots[0] if isinstance(shots, list) else shots),
                        entry.get("continuation_delimiter", " "), baselines[entry["label"]])
        path = root / "eval_data" / entry["dataset_uri"]
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        tasks.append(CoreTask(meta, items))
    return tasks


def ensure_bundle(bundle_dir: str | Path, *, url: str = EVAL_BUNDLE_URL, timeout_s: float = 10.0) -> Path:
    """The unpacked bundle at bundle_dir, downloaded and unpacked first when it is not there.

    Offline this raises SourceUnavailableError within about timeout_s (a reachability probe runs
    before the download, so nothing hangs); the message says to use the pack tasks instead."""
    dest = Path(bundle_dir)
    if (dest / "core.yaml").is_file():
        return dest
    try:
        check_reachable(url, timeout=timeout_s)
    except SourceUnavailableError as e:
        raise SourceUnavailableError(
            f"the CORE eval bundle is not on disk at {dest} and {url} is unreachable ({e}); evaluate "
            "offline with the pack tasks (evaluate config core_source=pack), or copy an unpacked "
            f"eval_bundle/ to {dest}"
        ) from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".eval_bundle-") as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(tmp)
        except (urllib.error.URLError, OSError, zipfile.BadZipFile) as e:
            raise DownloadError(f"downloading {url} failed ({e}); rerun, or use core_source=pack") from e
        found = [p.parent for p in Path(tmp).rglob("core.yaml")]
        if not found:
            raise DownloadError(f"{url} holds no core.yaml: not an eval bundle")
        found[0].rename(dest)
    return dest
