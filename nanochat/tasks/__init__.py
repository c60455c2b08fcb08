"""Chat tasks: the registry (`get_task`), the stages' training mixtures and the evaluation sets.

    from nanochat.tasks import get_task, training_mixture, eval_tasks
    arc = get_task("arc_easy", split="validation", stop=100)     # a Task: len(), get(i) -> conversation
    mix = training_mixture("sft", offline=True)                  # a TaskMixture, minus every eval item
    evals = eval_tasks(offline=True)                             # {"arc_easy": Task, ...}

Mixtures (as in the seed when the Hugging Face hub is reachable; from the embedded pack offline):
- midtrain  hub:  SmolTalk train, MMLU auxiliary_train, GSM8K train, identity x2, spelling, letter count
            pack: SciQ (with passages), SocialIQA, ARC-E/C validation, MMLU dev + validation,
                  arithmetic (tool use), identity x2, spelling, letter count
- sft       hub:  ARC-E/C train, GSM8K train, SmolTalk train[:10k], identity, spelling, letter count
            pack: the same multiple-choice sets (SocialIQA[:1000]), fewer synthetic examples
- rl        hub:  GSM8K train;  pack: the contaminated demo half of GSM8K test (`rl_task` also
            offers "toy": EndLetter, nanochat/tasks/end_letter.py, which a tiny model learns)
Evaluation: ARC-E/C test, MMLU test, GSM8K test (offline: its held-out half), HumanEval test.
Items of the evaluation sets are removed from the dataset-derived training tasks (`WithoutItems`;
MMLU dev/validation share ~30 questions with MMLU test), and `check_disjoint` proves the result.

Tests: `python -m pytest tests/test_tasks.py`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

from nanochat.errors import ConfigError
from nanochat.tasks.arc import ARC
from nanochat.tasks.arithmetic import Arithmetic
from nanochat.tasks.base import (
    LETTERS,
    MultipleChoiceTask,
    Task,
    TaskMixture,
    TaskSequence,
    WithoutItems,
    check_disjoint,
    find_overlap,
)
from nanochat.tasks.end_letter import EndLetter
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.identity import Identity
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.sciq import SciQ
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.social_iqa import SocialIQA
from nanochat.tasks.sources import Source, hub_reachable
from nanochat.tasks.spelling import LetterCount, Spelling


class TaskArgumentError(ConfigError, TypeError):
    """A task spec with an argument its task does not take."""


__all__ = [
    "ARC", "GSM8K", "LETTERS", "MMLU", "Arithmetic", "HumanEval", "Identity", "LetterCount",
    "MultipleChoiceTask", "SciQ", "SmolTalk", "SocialIQA", "Spelling", "Task", "TaskMixture", "TaskSequence",
    "WithoutItems", "TASKS", "STAGES", "check_disjoint", "eval_tasks", "find_overlap", "get_task",
    "training_mixture",
]

log = logging.getLogger(__name__)

TASKS: dict[str, Callable[..., Task]] = {
    "arc_easy": functools.partial(ARC, "easy"),
    "arc_challenge": functools.partial(ARC, "challenge"),
    "mmlu": MMLU,
    "gsm8k": GSM8K,
    "humaneval": HumanEval,
    "smoltalk": SmolTalk,
    "sciq": SciQ,
    "social_iqa": SocialIQA,
    "identity": Identity,
    "spelling": Spelling,
    "letter_count": LetterCount,
    "arithmetic": Arithmetic,
}
STAGES = ("midtrain", "sft", "rl")
SEED = 42  # mixture shuffle
SLICING = ("start", "stop", "step")  # keyword arguments every task takes


def get_task(name: str, **kwargs: object) -> Task:
    """The task called `name`, built with `kwargs` (split, source, start/stop/step, size, ...)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: the known tasks are {', '.join(sorted(TASKS))}")
    factory = TASKS[name]
    params = inspect.signature(factory).parameters
    accepted = [p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD] + list(SLICING)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TaskArgumentError(f"task {name!r} does not take {', '.join(unknown)}; "
                                f"it accepts {', '.join(accepted)}")
    return factory(**kwargs)


def _source(offline: bool | None) -> Source:
    if offline is None:
        offline = not hub_reachable()
    return "pack" if offline else "hub"


def eval_tasks(offline: bool | None = None) -> dict[str, Task]:
    """The chat evaluation sets by name; `offline` None asks `hub_reachable()`."""
    src = _source(offline)
    return {
        "arc_easy": ARC("easy", "test", source=src),
        "arc_challenge": ARC("challenge", "test", source=src),
        "mmlu": MMLU("test", source=src),
        "gsm8k": GSM8K("test", subset="heldout" if src == "pack" else "all", source=src),
        "humaneval": HumanEval("test", source=src),
    }


def _hub_mixture(stage: str) -> list[Task]:
    if stage == "midtrain":
        return [SmolTalk("train", source="hub"), MMLU("auxiliary_train", source="hub"),
                GSM8K("train", source="hub"),
                Identity(1000), Identity(1000), Spelling(200_000), LetterCount(80_000)]
    return [ARC("easy", "train", source="hub"), ARC("challenge", "train", source="hub"),
            GSM8K("train", source="hub"), SmolTalk("train", source="hub", stop=10_000),
            Identity(1000), Spelling(300), LetterCount(300)]


def _pack_mixture(stage: str) -> list[Task]:
    mid = stage == "midtrain"
    multiple_choice = [SciQ("validation", source="pack"),
                       SocialIQA("validation", source="pack", stop=None if mid else 1000),
                       ARC("easy", "validation", source="pack"),
                       ARC("challenge", "validation", source="pack"),
                       MMLU("dev", source="pack"), MMLU("validation", source="pack")]
    identity = [Identity(500), Identity(500)] if mid else [Identity(300)]
    synthetic = [Arithmetic(4000 if mid else 1000), Spelling(2000 if mid else 300),
                 LetterCount(2000 if mid else 300)]
    return multiple_choice + identity + synthetic


def training_mixture(stage: str, offline: bool | None = None, *, seed: int = SEED,
                     evals: dict[str, Task] | None = None) -> Task:
    """The training task of `stage` ("midtrain", "sft", "rl"), holding no item of the evaluation sets.

    `offline` True: the embedded pack; False: the Hugging Face hub; None: whichever
    `hub_reachable()` allows. `evals` defaults to `eval_tasks(offline)`.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} for a training mixture: "
                          f"choose one of {', '.join(STAGES)}")
    src = _source(offline)
    if stage == "rl":
        return GSM8K("test", subset="demo", source="pack") if src == "pack" else GSM8K("train", source="hub")
    evals = eval_tasks(src == "pack") if evals is None else evals
    keys = {task.item_key(i) for task in evals.values() for i in range(len(task))}
    tasks = []
    for task in _hub_mixture(stage) if src == "hub" else _pack_mixture(stage):
        if isinstance(task, (MultipleChoiceTask, GSM8K)):  # drawn from benchmark datasets: may share items
            task = WithoutItems(task, keys)
            if task.dropped:
                log.info("tasks: %s: dropped %d items that are in the evaluation sets", task.name,
                         task.dropped)
        tasks.append(task)
    mixture = TaskMixture(tasks, seed=seed)
    log.info("tasks: %s mixture from the %s: %d conversations: %s", stage, src, len(mixture),
             ", ".join(t.describe() for t in tasks))
    return mixture


def rl_task(kind: str, split: str, offline: bool | None) -> Task:
    """The RL stage's training task (split "train") or its held-out evaluation task ("eval"):
    "gsm8k" (the rl mixture above / GSM8K test, its held-out half offline) or "toy" (EndLetter)."""
    if split not in ("train", "eval"):
        raise ConfigError(f"unknown RL split {split!r}: use 'train' or 'eval'")
    if kind == "toy":
        return EndLetter(size=4096 if split == "train" else 256,
                         split="train" if split == "train" else "heldout")
    if kind != "gsm8k":
        raise ConfigError(f"unknown RL task {kind!r}: use 'gsm8k' or 'toy'")
    offline = not hub_reachable() if offline is None else offline
    if split == "train":
        return training_mixture("rl", offline)
    return GSM8K("test", subset="heldout" if offline else "all", source="pack" if offline else "hub")
