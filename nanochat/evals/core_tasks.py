"""Our offline CORE configuration: which evaluation sets of the embedded pack make up CORE-k, and how.

Without network there is no DCLM eval bundle, so CORE is computed over the pack's copies of the
CORE tasks it has (14 of DCLM's 22: the six BIG-bench tasks, Winograd and AGIEval LSAT-AR are
missing) and labelled `CORE-14 (our config)`: the numbers are not
comparable with the seed's CORE, whose items and renderings differ.

Each entry says which pack task and split, the task type, few-shot count, continuation delimiter
and random baseline, and a `render` that turns a pack row (fields in jobs/datapack.py) into the
bundle's item format consumed by nanochat/evals/core.py. Few-shot counts and delimiters follow DCLM's
core.yaml (the MosaicML gauntlet settings) as far as we know them; they were written down from
memory of that file, not checked against it offline. Random baselines are chance under random
guessing, 1 / number of options (DCLM differs on one: BoolQ, see below).

Splits: the labelled test split where the pack has one (ARC, OpenBookQA), else validation (the
only split the pack has for the others; Jeopardy's gauntlet split is called train). Chat training
(issue 6) may train on ARC validation, never on the test split used here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat.data.dataset import DownloadError, SourceUnavailableError, nanochat_home
from nanochat.errors import ConfigError
from nanochat.evals.core import (
    EVAL_BUNDLE_URL,
    CoreTask,
    TaskMeta,
    TaskType,
    ensure_bundle,
    load_bundle_tasks,
)
from nanochat.evals.harness import load_pack_items

Row = dict[str, Any]


def _question(row: Row) -> Row:  # ARC, CommonsenseQA: "Question: ...\nAnswer: <choice>"
    return {"query": f"Question: {row['question']}", "choices": row["choices"], "gold": row["answer"]}


def _plain(row: Row) -> Row:  # PIQA goal, OpenBookQA stem: the text itself leads into the answer
    return {"query": row["question"], "choices": row["choices"], "gold": row["answer"]}


def _hellaswag(row: Row) -> Row:  # "<activity>: <context>" continued by one of four endings
    return {"query": f"{row['activity_label']}: {row['question']}", "choices": row["choices"],
            "gold": row["answer"]}


def _copa(row: Row) -> Row:
    """"The man turned on the faucet, therefore" + " water flowed from the spout."."""
    connective = "because" if row["relation"] == "cause" else "therefore"
    premise = row["question"].rstrip().rstrip(".")
    choices = [c[:1].lower() + c[1:] for c in row["choices"]]
    return {"query": f"{premise} {connective}", "choices": choices, "gold": row["answer"]}


def _boolq(row: Row) -> Row:
    question = row["question"].rstrip("?")
    return {"query": f"Passage: {row['context']}\nQuestion: {question}?", "choices": row["choices"],
            "gold": row["answer"]}


def _winogrande(row: Row) -> Row:
    """Schema: the blank filled by each option ends the context; the rest of the sentence is scored."""
    text = row["question"]
    blank = text.index("_")
    options = [text[:blank] + choice for choice in row["choices"]]
    return {"context_options": options, "continuation": text[blank + 1:].strip(), "gold": row["answer"]}


def _lambada(row: Row) -> Row:
    return {"context": row["context"], "continuation": row["answer_text"]}


def _jeopardy(row: Row) -> Row:
    return {"context": f"{row['category']}: {row['question']}", "continuation": row["answer_text"]}


def _squad(row: Row) -> Row:
    return {"context": f"{row['context']}\nQuestion: {row['question']}", "continuation": row["answer_text"]}


def _coqa(row: Row) -> Row:
    turns = "".join(f"Question: {t['question']}\nAnswer: {t['answer']}\n\n" for t in row["history"])
    return {"context": f"{row['context']}\n\n{turns}Question: {row['question']}",
            "continuation": row["answer_text"]}


@dataclass(frozen=True)
class PackTask:
    """One CORE task computed from a pack evaluation set."""

    meta: TaskMeta
    pack_task: str  # directory under {home}/data/eval
    split: str  # file name without .jsonl
    render: Callable[[Row], Row]  # pack row -> bundle item


def _task(label: str, pack_task: str, split: str, task_type: TaskType, shots: int, delim: str,
          baseline: float, render: Callable[[Row], Row]) -> PackTask:
    return PackTask(TaskMeta(label, task_type, shots, delim, baseline), pack_task, split, render)


ANSWER = "\nAnswer: "  # DCLM's delimiter for question-style tasks; plain " " where text runs on
PACK_TASKS: dict[str, PackTask] = {t.meta.label: t for t in (
    # 4 endings, zero-shot and 10-shot both count in DCLM's CORE (they probe different abilities)
    _task("hellaswag_zeroshot", "hellaswag", "validation", "multiple_choice", 0, " ", 0.25, _hellaswag),
    # exact answer: no chance
    _task("jeopardy", "jeopardy", "train", "language_modeling", 10, ANSWER, 0.0, _jeopardy),
    # 4 options (a few 3/5)
    _task("arc_easy", "arc_easy", "test", "multiple_choice", 10, ANSWER, 0.25, _question),
    _task("arc_challenge", "arc_challenge", "test", "multiple_choice", 10, ANSWER, 0.25, _question),
    _task("copa", "copa", "validation", "multiple_choice", 0, " ", 0.5, _copa),  # 2 alternatives
    # 5
    _task("commonsense_qa", "commonsense_qa", "validation", "multiple_choice", 10, ANSWER, 0.2, _question),
    _task("piqa", "piqa", "validation", "multiple_choice", 10, ANSWER, 0.5, _plain),  # 2 solutions
    _task("openbook_qa", "openbookqa", "test", "multiple_choice", 0, " ", 0.25, _plain),  # 4 options
    # last word, greedy
    _task("lambada_openai", "lambada", "test", "language_modeling", 0, " ", 0.0, _lambada),
    _task("hellaswag", "hellaswag", "validation", "multiple_choice", 10, " ", 0.25, _hellaswag),
    _task("winogrande", "winogrande", "validation", "schema", 0, " ", 0.5, _winogrande),  # 2 fillers
    _task("squad", "squad", "validation", "language_modeling", 10, ANSWER, 0.0, _squad),
    _task("coqa", "coqa", "validation", "language_modeling", 0, ANSWER, 0.0, _coqa),
    # DCLM centres BoolQ at 0.62, the share of "yes" (majority class); we use chance (2 options), so
    # a model that knows nothing scores 0 rather than negative
    _task("boolq", "boolq", "validation", "multiple_choice", 10, ANSWER, 0.5, _boolq),
)}


def core_label(num_tasks: int) -> str:
    """How a pack CORE result is named: CORE-k (our config)."""
    return f"CORE-{num_tasks} (our config)"


def check_task_names(names: Sequence[str] | None) -> list[str]:
    """The task labels to run (all when names is None); unknown names are an error listing the known."""
    if names is None:
        return list(PACK_TASKS)
    if not names:
        raise ConfigError("no CORE tasks selected: give at least one, or leave the list unset for all")
    unknown = [n for n in names if n not in PACK_TASKS]
    if unknown:
        raise ConfigError(f"unknown CORE task(s) {unknown}; the pack config has {list(PACK_TASKS)}")
    return list(names)


def pack_core_tasks(names: Sequence[str] | None = None, eval_dir: str | Path | None = None) -> list[CoreTask]:
    """The selected pack tasks with all their items rendered into the bundle format."""
    tasks = []
    for label in check_task_names(names):
        spec = PACK_TASKS[label]
        rows = load_pack_items(spec.pack_task, spec.split, eval_dir)
        tasks.append(CoreTask(spec.meta, [spec.render(row) for row in rows]))
    return tasks


@dataclass
class CoreSelection:
    """The CORE tasks an evaluation will run, where they came from, and the result's name."""

    tasks: list[CoreTask]
    source: str  # "bundle" or "pack"
    label: str  # "CORE", "CORE-k (bundle subset)" or "CORE-k (our config)"
    note: str  # one line for logs and the result file


def default_bundle_dir() -> Path:
    """Where the DCLM eval bundle is unpacked: {home}/eval_bundle."""
    return nanochat_home() / "eval_bundle"


def select_core_tasks(source: str, names: Sequence[str] | None = None, *, eval_dir: str | Path | None = None,
                      bundle_dir: str | Path | None = None, timeout_s: float = 10.0,
                      url: str = EVAL_BUNDLE_URL) -> CoreSelection:
    """CORE tasks from "bundle" (the real one; an error offline), "pack" (our config), or "auto"
    (the bundle when it is on disk or downloads, else the pack, saying why in `note`)."""
    if source not in ("auto", "bundle", "pack"):
        raise ConfigError(f"unknown CORE source {source!r}: use auto, bundle or pack")
    note = ""
    if source in ("auto", "bundle"):
        root = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
        try:
            root = ensure_bundle(root, url=url, timeout_s=timeout_s)
        except (SourceUnavailableError, DownloadError) as e:
            if source == "bundle":
                raise
            note = f"DCLM eval bundle unavailable, using the pack tasks: {e}"
        else:
            tasks = load_bundle_tasks(root, names)
            label = "CORE" if names is None else f"CORE-{len(tasks)} (bundle subset)"
            return CoreSelection(tasks, "bundle", label, f"DCLM eval bundle at {root}")
    tasks = pack_core_tasks(names, eval_dir)
    return CoreSelection(tasks, "pack", core_label(len(tasks)),
                         note or "pack tasks (nanochat/evals/core_tasks.py)")
