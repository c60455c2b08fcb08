"""The Task interface, mixtures of tasks, multiple-choice rendering and the train/eval overlap check.

A task is a sized sequence of conversations, the shape `Tokenizer.render_conversation` takes:
    {"messages": [{"role": "system"|"user"|"assistant", "content": str | [part, ...]}], ...extra keys}
    part = {"type": "text"|"python"|"python_output", "text": str}
Extra keys carry what evaluation needs (`letters` of a multiple-choice item, HumanEval's `test`).

Notable:
- slicing at construction (`start`, `stop`, `step`, Python slice semantics on the task's rows);
- `eval_type`: "categorical" (answer = one of `conversation["letters"]`, scored by a restricted
  argmax), "generative" (sampled text checked by `evaluate`), None (training-only);
- `evaluate(conversation, answer_text)` -> bool and `reward(...)` -> float (RL) take the
  conversation, not an index, so sharded evaluation actors need nothing else;
- `item_key(i)`: a content hash of item i (question + choices for multiple choice, the user
  messages otherwise) so the same item is recognised in any task and split;
- `TaskMixture`: every item of every task once, shuffled by a seed (list a task twice to
  oversample it); `TaskSequence`: tasks one after another (a curriculum);
- `WithoutItems` drops the items whose keys are given; `find_overlap` / `check_disjoint` prove
  that a training task and evaluation tasks share no item.

Tests: `python -m pytest tests/test_tasks.py`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, Literal

from nanochat.errors import ConfigError
from nanochat.sandbox import ExecResult, format_tool_output, render_value

EvalType = Literal["categorical", "generative"]
LETTERS = tuple("ABCDEFGHIJ")  # multiple-choice labels; no task here has more than 10 choices


def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped (for content keys)."""
    return " ".join(text.split()).lower()


def content_key(*texts: str) -> str:
    """sha256 hex of the normalised texts joined by NUL: equal content gives an equal key."""
    return hashlib.sha256("\0".join(normalise(t) for t in texts).encode("utf-8")).hexdigest()


def user_texts(conversation: dict) -> list[str]:
    """The str contents of a conversation's system and user messages, in order."""
    return [m["content"] for m in conversation["messages"] if m["role"] in ("system", "user")]


def assistant_text(message: dict) -> str:
    """All text of an assistant message: a str content, or its parts' texts concatenated."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def tool_call_parts(code: str, value: Any) -> list[dict]:
    """A python part running `code` and the python_output part the sandbox prints for its `value`.

    The output text is what `format_tool_output` makes of a run whose trailing expression is
    `value` (no prints): e.g. 48 / 2 -> "24", 0.1 + 0.2 -> "0.3", "abc".count("b") -> "1".
    """
    result = ExecResult(status="ok", stdout="", stderr="", value=render_value(value), error=None,
                        duration_s=0.0)
    return [{"type": "python", "text": code}, {"type": "python_output", "text": format_tool_output(result)}]


class Task:
    """Base class: subclasses set `name` and `eval_type` and implement `num_examples` and `get_example`."""

    name: str = "task"
    eval_type: EvalType | None = None
    random_baseline: float = 0.0  # expected accuracy of random answers (ChatCORE centres on it)

    def __init__(self, *, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        if start < 0 or (stop is not None and stop < 0) or step < 1:
            raise ConfigError("task slice needs start >= 0, stop >= 0 or None, step >= 1; "
                              f"got {start}:{stop}:{step}")
        self.start, self.stop, self.step = start, stop, step

    # -- what subclasses provide -------------------------------------------------------------------

    def num_examples(self) -> int:
        """Number of rows before slicing."""
        raise NotImplementedError(f"{type(self).__name__} must implement num_examples()")

    def get_example(self, index: int) -> dict:
        """Conversation of row `index` (before slicing)."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_example(index)")

    def example_key(self, index: int) -> str:
        """Content key of row `index` (before slicing); default: the hash of its user messages."""
        return content_key(*user_texts(self.get_example(index)))

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        """Whether `answer_text` (the model's answer to the conversation's last user turn) is right."""
        raise TypeError(f"{self.name} is a training-only task: it has no answers to evaluate")

    def reward(self, conversation: dict, answer_text: str) -> float:
        """RL reward of an answer: 1.0 if `evaluate` says right, else 0.0."""
        return float(self.evaluate(conversation, answer_text))

    # -- the sliced view -------------------------------------------------------------------------

    def _row(self, i: int) -> int:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} examples")
        return self.start + i * self.step

    def __len__(self) -> int:
        return len(range(*slice(self.start, self.stop, self.step).indices(self.num_examples())))

    def get(self, i: int) -> dict:
        """Conversation i of the sliced task."""
        return self.get_example(self._row(i))

    def item_key(self, i: int) -> str:
        """Content key of item i of the sliced task."""
        return self.example_key(self._row(i))

    def __getitem__(self, i: int) -> dict:
        return self.get(i)

    def __iter__(self) -> Iterator[dict]:
        return (self.get(i) for i in range(len(self)))

    def describe(self) -> str:
        """name[start:stop:step] (n examples), for logs and errors."""
        stop = "" if self.stop is None else self.stop
        step = "" if self.step == 1 else f":{self.step}"
        return f"{self.name}[{self.start}:{stop}{step}] ({len(self)} examples)"


class WithoutItems(Task):
    """`task` minus the items whose `item_key` is in `keys` (e.g. an evaluation set's items)."""

    def __init__(self, task: Task, keys: Collection[str], **slicing: int | None) -> None:
        super().__init__(**slicing)
        self.task = task
        self.name, self.eval_type, self.random_baseline = task.name, task.eval_type, task.random_baseline
        self._kept = [i for i in range(len(task)) if task.item_key(i) not in keys]
        self.dropped = len(task) - len(self._kept)

    def num_examples(self) -> int:
        return len(self._kept)

    def get_example(self, index: int) -> dict:
        return self.task.get(self._kept[index])

    def example_key(self, index: int) -> str:
        return self.task.item_key(self._kept[index])

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        return self.task.evaluate(conversation, answer_text)

    def reward(self, conversation: dict, answer_text: str) -> float:
        return self.task.reward(conversation, answer_text)


class _Combined(Task):
    """Tasks seen as one: item i is (task index, index in that task) from `self._index`."""

    kind = "combination"

    def __init__(self, tasks: Sequence[Task], **slicing: int | None) -> None:
        super().__init__(**slicing)
        self.tasks = list(tasks)
        if not self.tasks:
            raise ConfigError(f"a {type(self).__name__} needs at least one task, got none")
        empty = [t.describe() for t in self.tasks if len(t) == 0]
        if empty:
            raise ConfigError(
                f"{type(self).__name__} has tasks with zero examples: {', '.join(empty)}; check their "
                "slices (start/stop) and that their datasets loaded (see the tasks' log lines)"
            )
        self.name = f"{self.kind}({', '.join(t.name for t in self.tasks)})"
        kinds = {t.eval_type for t in self.tasks}
        self.eval_type = kinds.pop() if len(kinds) == 1 else None
        self._index = self._build_index([len(t) for t in self.tasks])

    def _build_index(self, sizes: list[int]) -> list[tuple[int, int]]:
        return [(t, i) for t, n in enumerate(sizes) for i in range(n)]

    def num_examples(self) -> int:
        return len(self._index)

    def get_example(self, index: int) -> dict:
        t, i = self._index[index]
        return self.tasks[t].get(i)

    def example_key(self, index: int) -> str:
        t, i = self._index[index]
        return self.tasks[t].item_key(i)

    def task_of(self, i: int) -> Task:
        """The task that item i of the (sliced) combination comes from."""
        return self.tasks[self._index[self._row(i)][0]]

    def counts(self) -> dict[str, int]:
        """Examples per task name in the (sliced) combination (a task listed twice counts twice)."""
        out: dict[str, int] = {}
        for i in range(len(self)):
            name = self.task_of(i).name
            out[name] = out.get(name, 0) + 1
        return out


class TaskMixture(_Combined):
    """Every item of every task, in one order shuffled by `seed`; list a task twice to oversample it."""

    kind = "mixture"

    def __init__(self, tasks: Sequence[Task], *, seed: int = 42, **slicing: int | None) -> None:
        self.seed = seed
        super().__init__(tasks, **slicing)

    def _build_index(self, sizes: list[int]) -> list[tuple[int, int]]:
        index = super()._build_index(sizes)
        random.Random(self.seed).shuffle(index)
        return index


class TaskSequence(_Combined):
    """The tasks one after another, each in its own order (a curriculum)."""

    kind = "sequence"


def find_overlap(train: Task, evals: Iterable[Task], limit: int = 10) -> list[tuple[str, str, int]]:
    """Up to `limit` items of `train` that some evaluation task also holds: (eval task name, key,
    train index)."""
    owners: dict[str, str] = {}
    for task in evals:
        for i in range(len(task)):
            owners.setdefault(task.item_key(i), task.name)
    found = []
    for i in range(len(train)):
        key = train.item_key(i)
        if key in owners:
            found.append((owners[key], key, i))
            if len(found) >= limit:
                break
    return found


def check_disjoint(train: Task, evals: Iterable[Task]) -> None:
    """Raise ValueError naming the shared items if `train` holds any item of the evaluation tasks."""
    evals = list(evals)
    found = find_overlap(train, evals)
    if found:
        shown = "; ".join(f"train item {i} is in {name} (key {key[:12]})" for name, key, i in found)
        raise ConfigError(
            f"the training task {train.name} shares items with the evaluation sets "
            f"({', '.join(t.name for t in evals)}): {shown}. Wrap the training tasks in WithoutItems "
            "with the evaluation keys (training_mixture does this)"
        )


# ----------------------------------------------------------------------------- multiple choice


def render_multiple_choice(question: str, choices: Sequence[str], *, context: str = "",
                           context_label: str = "", header: str = "") -> str:
    """The user message of a multiple-choice item: optional header and context, question, lettered
    choices."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ConfigError(f"a multiple-choice item needs 2..{len(LETTERS)} choices, "
                          f"got {len(choices)}: {question!r}")
    lines = [header, ""] if header else []
    if context.strip():
        lines += [f"{context_label}: {context.strip()}" if context_label else context.strip(), ""]
    lines.append(f"Question: {question.strip()}")
    lines += [f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, choices, strict=False)]
    lines += ["", "Answer with the letter of the correct choice."]
    return "\n".join(lines)


class MultipleChoiceTask(Task):
    """Rows with `question`, `choices`, `answer` (index); user: lettered choices, assistant: the letter."""

    eval_type = "categorical"
    random_baseline = 0.25
    context_label = ""  # how a row's `context` is introduced ("" = no context shown)

    def __init__(self, rows: Sequence[dict], name: str, **slicing: int | None) -> None:
        super().__init__(**slicing)
        self.rows, self.name = rows, name
        self.origin = getattr(rows, "origin", "given rows")

    def header(self, row: dict) -> str:
        """A line before the question (MMLU names the subject); none by default."""
        return ""

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        letters = list(LETTERS[: len(row["choices"])])
        context = row.get("context", "") if self.context_label else ""
        user = render_multiple_choice(row["question"], row["choices"], context=context,
                                      context_label=self.context_label, header=self.header(row))
        return {
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": letters[row["answer"]]}],
            "letters": letters,
        }

    def example_key(self, index: int) -> str:
        row = self.rows[index]
        return content_key(row["question"], *sorted(row["choices"], key=normalise))

    def evaluate(self, conversation: dict, answer_text: str) -> bool:
        """Right when the answer, stripped of whitespace, is exactly the correct letter."""
        return answer_text.strip() == assistant_text(conversation["messages"][-1])
