"""Chat evaluation of a chat model (ARC-Easy/Challenge, MMLU, GSM8K, HumanEval, ChatCORE), free of Ray.

    requests = chat_requests(eval_tasks(offline=True), max_per_task=100, seed=1337)
    answers = score_choices(state, categorical) + SampleAnswers(settings)(state, generative)
    results = check_answers(requests, answers, tasks)            # -> [ItemResult]
    doc = chat_results(tasks, aggregate(results), num_samples)   # {"tasks": {...}, "chatcore": x}

Notable:
- requests carry the conversation (`Task.get(i)`), so an evaluation actor needs nothing but the
  model: `score_choices`, `SampleAnswers` and `check_format` are `fn(state, requests)` functions for
  cluster/eval_pool.py and give one `ChatAnswer` per request;
- categorical items (ARC, MMLU): one forward pass over the prompt that ends with
  <|assistant_start|>; the argmax of the logits restricted to the item's answer letters is the
  answer. Exact ties share the credit (1/k for k tied letters, as CORE does), so a model with
  uniform logits scores 1/num_choices;
- generative items (GSM8K, HumanEval): `num_samples` sampled answers from the engine, seeded by
  (seed, task, index) so a result never depends on which actor or chunk an item lands in; the
  Python tool runs through a `tool_run` callable (the sandbox pool's). `check_answers` checks them
  in the driver: GSM8K by `Task.evaluate`, HumanEval through a checker built on
  nanochat/evals/humaneval_check.py (the sandbox pool's, or a local Sandbox). An item passes when any
  of its samples does: pass@k with k = num_samples;
- prompts longer than the model's context keep their last tokens (generative ones leave room for
  the answer); how many were cut is reported per task;
- ChatCORE: the mean over tasks of (accuracy - baseline) / (1 - baseline), baselines 0.25 for
  ARC/MMLU and 0 for GSM8K/HumanEval (`Task.random_baseline`);
- the format metric (`check_format`): on fixed multiple-choice items, greedy FREE generation (any
  token allowed) counts as well formed when it is exactly one of the item's letters followed by
  <|assistant_end|>. It measures whether a model learned the chat answer format, whatever it knows.

Generative items of one chunk decode together (up to GENERATION_ROWS rows, admitted as rows free
up; format items, prefill-bound, run one at a time); each row draws from a generator seeded by its
item (`item_seed`), so an item's samples do not depend on its batch, chunk or actor, and sharding
over any number of actors gives the same totals (up to the last bits of a batched matmul; tested
against one item at a time).
Tests: `python -m pytest tests/test_chat_eval.py`.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from nanochat.common import autocast_context
from nanochat.errors import ConfigError
from nanochat.evals.core import option_credit
from nanochat.evals.harness import EvalState, ItemResult, TaskTotals, centred_mean
from nanochat.tasks import HumanEval, Task
from nanochat.tasks.base import assistant_text
from nanochat.tasks.humaneval import extract_code

Kind = Literal["categorical", "generative", "format"]
CHAT_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval")  # ChatCORE's tasks, in report order
SELECT_SEED = 1337  # a capped task evaluates a seeded sample of its items (sorted back into task order)
FORMAT_TASK = "format"  # the task name of format results
FORMAT_TOKENS = 8  # free tokens generated per format item: a letter and <|assistant_end|> need 2
MIN_ANSWER_ROOM = 16  # context positions a generative prompt always leaves for the answer
GENERATION_ROWS = 32  # rows an evaluation actor decodes together (its KV cache: rows x context)


@dataclass(frozen=True)
class ChatRequest:
    """One item to evaluate: its task, its index in the task, its conversation, and how to run it."""

    task: str  # evaluation task name, e.g. "arc_easy"
    index: int  # item index in that task
    conversation: dict  # Task.get(index): messages (the last one is the reference answer), letters, ...
    kind: Kind


@dataclass(frozen=True)
class ChatAnswer:
    """What the model answered to one request."""

    task: str
    index: int
    texts: tuple[str, ...]  # the chosen letter (categorical), k samples (generative), the free text (format)
    score: float | None  # known in the actor for categorical and format items; None: check_answers decides
    truncated: bool  # the prompt lost its first tokens to fit the context
    seconds: float


@dataclass(frozen=True)
class SampleSettings:
    """How generative items are sampled."""

    num_samples: int = 1  # k of pass@k
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (then num_samples must be 1)
    top_k: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"num_samples and max_new_tokens must be >= 1, got {self.num_samples} and "
                             f"{self.max_new_tokens}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError(f"{self.num_samples} samples at temperature 0 would all be the same "
                              "greedy answer: set a temperature > 0 or num_samples = 1")


# ----------------------------------------------------------------------------- requests (driver)


def select_tasks(tasks: dict[str, Task], names: Sequence[str] | None) -> dict[str, Task]:
    """The evaluation tasks called `names` (all when None), in the order given; unknown names are an error."""
    if names is None:
        return dict(tasks)
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ConfigError(f"unknown chat task(s) {unknown}: the chat evaluation tasks are {', '.join(tasks)}")
    if not names:
        raise ConfigError(f"no chat task selected: name at least one of {', '.join(tasks)}")
    return {n: tasks[n] for n in names}


def select_indices(n: int, max_items: int | None, seed: int = SELECT_SEED) -> list[int]:
    """range(n), or a seeded sample of max_items of it in increasing order."""
    if max_items is None or max_items >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_items))


def chat_requests(tasks: dict[str, Task], max_per_task: int | None = None,
                  seed: int = SELECT_SEED) -> list[ChatRequest]:
    """One request per evaluated item of each task (a seeded sample of max_per_task when set)."""
    requests = []
    for name, task in tasks.items():
        if task.eval_type is None:
            raise ConfigError(f"task {name!r} ({task.describe()}) is training-only: "
                              "it has no answers to evaluate")
        if len(task) == 0:
            raise ConfigError(f"chat task {name!r} has zero items ({task.describe()}): check its source")
        requests += [ChatRequest(name, i, task.get(i), task.eval_type)
                     for i in select_indices(len(task), max_per_task, seed)]
    return requests


def format_requests(tasks: dict[str, Task], num_items: int, seed: int = SELECT_SEED) -> list[ChatRequest]:
    """`num_items` fixed multiple-choice items for the format metric, shared out evenly over the
    categorical tasks (in name order), each a seeded sample; index = position in the format set."""
    mc = {n: t for n, t in sorted(tasks.items()) if t.eval_type == "categorical"}
    if not mc:
        raise ConfigError(f"the format metric needs a multiple-choice task; the tasks are {', '.join(tasks)}")
    shares = [num_items // len(mc) + (1 if k < num_items % len(mc) else 0) for k in range(len(mc))]
    requests: list[ChatRequest] = []
    for (name, task), share in zip(mc.items(), shares, strict=True):
        if share > len(task):
            raise ConfigError(f"the format metric wants {share} items of {name!r}, which has {len(task)}")
        for i in select_indices(len(task), share, seed):
            requests.append(ChatRequest(FORMAT_TASK, len(requests), task.get(i), "format"))
    return requests


# ----------------------------------------------------------------------------- in the actors


def letter_ids(tokenizer: Any, letters: Sequence[str]) -> list[int]:
    """The single token id of each answer letter; an error if a letter is not one token."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(encoded)} tokens {encoded}, "
                             "expected one")
        ids.append(encoded[0])
    return ids


def fit_prompt(ids: list[int], limit: int | None) -> tuple[list[int], bool]:
    """(the last `limit` ids, whether any were cut)."""
    if limit is None or len(ids) <= limit:
        return ids, False
    return ids[-limit:], True


def _generation_limit(state: EvalState, max_new_tokens: int) -> int:
    """Longest prompt that leaves room for an answer in the model's context."""
    context = state.max_seq_len or state.model.config.sequence_len
    return max(1, context - min(max_new_tokens, max(MIN_ANSWER_ROOM, context // 2)))


@torch.no_grad()
def score_choices(state: EvalState, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
    """Categorical items: argmax over the item's letters of the next-token logits after
    <|assistant_start|>."""
    out = []
    for r in requests:
        t0 = time.perf_counter()
        ids, cut = fit_prompt(state.tokenizer.render_for_completion(r.conversation), state.max_seq_len)
        letters = r.conversation["letters"]
        idx = torch.tensor([ids], dtype=torch.long, device=state.device)
        with autocast_context(state.device):
            logits = state.model(idx)[0, -1].float()  # (V,) the next token after <|assistant_start|>
        chosen = logits[torch.tensor(letter_ids(state.tokenizer, letters), device=logits.device)]  # (L,)
        gold = letters.index(assistant_text(r.conversation["messages"][-1]))
        credit = option_credit([-float(v) for v in chosen.double()], gold)  # exact ties share the credit
        out.append(ChatAnswer(r.task, r.index, (letters[int(chosen.argmax())],), credit, cut,
                              time.perf_counter() - t0))
    return out


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    return tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()


def _tool_use(tokenizer: Any, run: Callable[[str], str]) -> Any:
    from nanochat.engine import ToolUse

    sp = tokenizer.encode_special
    return ToolUse(run=run, encode=tokenizer.encode, decode=tokenizer.decode,
                   python_start=sp("<|python_start|>"),
                   python_end=sp("<|python_end|>"), output_start=sp("<|output_start|>"),
                   output_end=sp("<|output_end|>"))


def item_seed(seed: int, task: str, index: int) -> int:
    """The sampling seed of one item: independent of sharding, different for every (task, index)."""
    return (seed * 1_000_003 + zlib.crc32(f"{task}/{index}".encode())) % (2**31)


@dataclass(frozen=True)
class SampleAnswers:
    """fn(state, requests) for EvalPool.map: `settings.num_samples` sampled answers per generative item.

    tool_run: code -> output text for the engine's Python tool (the sandbox pool's `tool()`); None
    runs without the tool (a python block is then plain text)."""

    settings: SampleSettings
    tool_run: Callable[[str], str] | None = None

    @property
    def __name__(self) -> str:  # EvalPool names the function in its errors
        return "SampleAnswers"

    @torch.no_grad()
    def __call__(self, state: EvalState, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
        from nanochat.engine import SamplingParams

        s = self.settings
        tok = state.tokenizer
        limit = _generation_limit(state, s.max_new_tokens)
        stops = _stop_ids(tok)
        prompts = [fit_prompt(tok.render_for_completion(r.conversation), limit) for r in requests]
        params = [SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                 seed=item_seed(s.seed, r.task, r.index), stop_token_ids=stops,
                                 n=s.num_samples) for r in requests]
        tool = _tool_use(tok, self.tool_run) if self.tool_run is not None else None
        gens, seconds = _generate_together(state, [ids for ids, _ in prompts], params, tool)

        def text(g: Any) -> str:
            return tok.decode(g.tokens[:-1] if g.finish_reason == "stop" else g.tokens)

        return [ChatAnswer(r.task, r.index, tuple(text(g) for g in item), None, cut, seconds)
                for r, (_, cut), item in zip(requests, prompts, gens, strict=True)]


def _generate_together(state: EvalState, prompts: list[list[int]], params: list[Any],
                       tool: Any = None, rows: int = GENERATION_ROWS) -> tuple[list[list[Any]], float]:
    """Every prompt's generations, up to `rows` rows decoding together (each row samples from its
    own seeded draws, so the tokens are those of one prompt at a time); and the seconds per prompt
    (the batch's wall time shared equally)."""
    from nanochat.engine import Engine

    if not prompts:
        return [], 0.0
    t0 = time.perf_counter()
    rows = max(max(p.n for p in params), min(rows, sum(p.n for p in params)))
    engine = Engine(state.model, max_batch_size=rows, max_seq_len=state.max_seq_len, tool_use=tool)
    try:
        with autocast_context(state.device):
            gens = engine.generate_each(prompts, params)
    finally:
        engine.close()
    return gens, (time.perf_counter() - t0) / len(prompts)


@torch.no_grad()
def check_format(state: EvalState, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
    """Format items: greedy free generation; 1.0 when it is exactly one of the item's letters, then
    <|assistant_end|>, else 0.0. The text (at most FORMAT_TOKENS tokens) is kept for people."""
    from nanochat.engine import SamplingParams

    tok = state.tokenizer
    end = tok.encode_special("<|assistant_end|>")
    params = SamplingParams(max_new_tokens=FORMAT_TOKENS, temperature=0.0, stop_token_ids=_stop_ids(tok))
    limit = _generation_limit(state, FORMAT_TOKENS)
    prompts = [fit_prompt(tok.render_for_completion(r.conversation), limit) for r in requests]
    # one row: a format item is its prompt's prefill and 2 tokens, and prefills batched together are
    # padded to the longest (benchmarks/eval_speed.py: 0.64x at 40 items, 0.98x at 100, batched)
    gens, seconds = _generate_together(state, [ids for ids, _ in prompts], [params] * len(requests), rows=1)
    out = []
    for r, (_, cut), item in zip(requests, prompts, gens, strict=True):
        tokens = item[0].tokens
        ok = (len(tokens) == 2 and tokens[1] == end
              and tokens[0] in letter_ids(tok, r.conversation["letters"]))
        out.append(ChatAnswer(r.task, r.index, (tok.decode(tokens),), float(ok), cut, seconds))
    return out


# ----------------------------------------------------------------------------- checking and totals (driver)

HumanEvalChecker = Callable[[list[dict[str, str]]], list[bool]]  # problems -> passed, in order


def local_humaneval_checker(timeout_s: float = 10.0) -> HumanEvalChecker:
    """A HumanEval checker on a Sandbox in this process (nanochat/evals/humaneval_check.py), one at a time."""
    from nanochat.evals.humaneval_check import check_completion
    from nanochat.sandbox import Sandbox

    sandbox = Sandbox()

    def check(problems: list[dict[str, str]]) -> list[bool]:
        run = lambda program: sandbox.run(program, timeout_s=timeout_s)  # noqa: E731
        return [check_completion(run, p["prompt"], p["completion"], p["test"], p["entry_point"]).passed
                for p in problems]

    return check


def check_answers(requests: Sequence[ChatRequest], answers: Sequence[ChatAnswer], tasks: dict[str, Task],
                  humaneval: HumanEvalChecker | None = None) -> list[ItemResult]:
    """One ItemResult per answer: the actor's score, or for generative items 1.0 when any sample is
    right (GSM8K: Task.evaluate; HumanEval: `humaneval`, default a local sandbox checker)."""
    if len(requests) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(requests)} requests")
    scores: list[float | None] = [a.score for a in answers]
    problems: list[dict[str, str]] = []
    owners: list[int] = []  # problem -> answer position
    for k, (r, a) in enumerate(zip(requests, answers, strict=True)):
        if (r.task, r.index) != (a.task, a.index):
            raise ValueError(f"answer {k} is for {a.task}/{a.index}, but request {k} is {r.task}/{r.index}")
        if a.score is not None:
            continue
        task = tasks[r.task]
        if isinstance(task, HumanEval):
            conv = r.conversation
            problems += [{"prompt": conv["prompt"], "completion": extract_code(text), "test": conv["test"],
                          "entry_point": conv["entry_point"]} for text in a.texts]
            owners += [k] * len(a.texts)
            scores[k] = 0.0
        else:
            scores[k] = float(any(task.evaluate(r.conversation, text) for text in a.texts))
    if problems:
        verdicts = (humaneval or local_humaneval_checker())(problems)
        for k, passed in zip(owners, verdicts, strict=True):
            scores[k] = max(scores[k], float(passed))
    return [ItemResult(a.task, a.index, float(s), a.seconds) for a, s in zip(answers, scores, strict=True)]


def chat_results(tasks: dict[str, Task], totals: dict[str, TaskTotals], answers: Sequence[ChatAnswer],
                 num_samples: int) -> dict[str, Any]:
    """{"tasks": {name: accuracy, centered, baseline, ...}, "chatcore": mean centred accuracy, "label"}."""
    missing = [n for n in tasks if n not in totals]
    if missing:
        raise ValueError(f"no results for chat task(s) {missing}")
    accuracies = {n: totals[n].accuracy for n in tasks}
    centred, chatcore = centred_mean(accuracies, {n: t.random_baseline for n, t in tasks.items()})
    cut: dict[str, int] = {}
    for a in answers:
        cut[a.task] = cut.get(a.task, 0) + int(a.truncated)
    out = {
        n: {"accuracy": accuracies[n], "centered": centred[n], "random_baseline": t.random_baseline,
            "eval_type": t.eval_type,
            "metric": "accuracy" if t.eval_type == "categorical" else f"pass@{num_samples}",
            "num_items": totals[n].count, "prompts_truncated": cut.get(n, 0), "source": t.describe(),
            "actor_seconds": round(totals[n].seconds, 3)}
        for n, t in tasks.items()
    }
    full = set(tasks) == set(CHAT_TASKS)
    label = "ChatCORE" if full else f"ChatCORE over {', '.join(tasks)}"
    return {"tasks": out, "chatcore": chatcore, "label": label}


def format_summary(answers: Sequence[ChatAnswer], examples: int = 5) -> dict[str, Any]:
    """{"format_rate": well-formed share, "format": {num_items, well_formed, examples}} of format answers."""
    if not answers:
        raise ValueError("no format answers to summarise")
    good = sum(a.score or 0.0 for a in answers)
    return {"format_rate": good / len(answers),
            "format": {"num_items": len(answers), "well_formed": int(good),
                       "prompts_truncated": sum(a.truncated for a in answers),
                       "examples": [a.texts[0] for a in answers[:examples]]}}
